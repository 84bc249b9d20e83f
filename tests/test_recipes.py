"""The shipped recipes: each validates and resolves against the real architecture it names
(config only, on the meta device, nothing downloaded), its header says how to launch it, on
what hardware and in how much memory, and its scaled-down twin trains on 2 real ranks with
the same statistics with activation checkpointing on and off.

A recipe's twin is the recipe itself with everything that shapes the algorithm and the engine
kept (LoRA targets, rank, alpha and dropout, the LoRA-drop settings, the DeepSpeed JSON, the
dtype, the learning rates) and only the sizes scaled down: a random LLaMA of 4 layers with the
real model's structure (grouped-query ratio, tied embeddings, MLP ratio, RoPE base, norm eps),
16 rows of the shipped WordNet data in the recipe's columns, the micro-batch halved and the
accumulation capped at 2, 2 sampling steps and 1 main step, no eval set.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, run_ranks_many

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
TRAIN = REPO / "launch" / "train.py"
WORDNET_TRAIN = REPO / "data" / "wordnet_categories" / "train.jsonl"

# The published config.json of every model a recipe names (the fields that shape the
# model), so a recipe is checked against its real architecture without a hub.
REAL_MODELS = {
    "builtin:smollm2-135m-instruct": dict(  # HuggingFaceTB/SmolLM2-135M-Instruct
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True),
    "meta-llama/Llama-2-7b-hf": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False),
    "meta-llama/Llama-2-13b-hf": dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False),
    "meta-llama/Meta-Llama-3-70B": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False),
}

TWIN_LAYERS = 4
TWIN_HEAD_DIM = 16
SAMPLING_STEPS = 2
WORLD = 2


def _llama_config(arch: dict):
    from transformers import LlamaConfig

    arch = dict(arch)
    rope_theta = arch.pop("rope_theta")
    config = LlamaConfig(**arch, hidden_act="silu", bos_token_id=1, eos_token_id=2)
    # transformers 5 keeps the RoPE base in rope_parameters; older releases in rope_theta.
    if isinstance(getattr(config, "rope_parameters", None), dict):
        config.rope_parameters["rope_theta"] = rope_theta
    config.rope_theta = rope_theta
    return config


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None)
    return float(params["rope_theta"]) if isinstance(params, dict) else float(config.rope_theta)


def _recipe_id(path: Path) -> str:
    return path.stem


def _header(recipe: Path) -> str:
    lines = []
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines)


# ----------------------------------------------------------------- cheap: no training


@pytest.mark.parametrize("recipe", RECIPES, ids=_recipe_id)
def test_recipe_resolves_against_its_real_architecture(recipe, tmp_path):
    """The recipe validates, its target modules exist in the real model (built on the meta
    device from its config alone) and its DeepSpeed JSON resolves for that model."""
    from loradrop_ds.config import load_config
    from loradrop_ds.engine import SizeHints, load_ds_config
    from loradrop_ds.model_dims import dims_from_config

    cfg = load_config(recipe)
    assert cfg.model.path in REAL_MODELS, f"{recipe.name}: add the architecture of {cfg.model.path} to REAL_MODELS"
    real = _llama_config(REAL_MODELS[cfg.model.path])
    modules = dims_from_config(real, cfg.lora.target_modules)
    assert modules.num_layers == real.num_hidden_layers
    h, kv = real.hidden_size, real.num_key_value_heads * (real.hidden_size // real.num_attention_heads)
    expected = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, real.intermediate_size), "up_proj": (h, real.intermediate_size),
                "down_proj": (real.intermediate_size, h)}
    assert modules.shapes == {m: expected[m] for m in cfg.lora.target_modules}
    ds = load_ds_config(cfg, 8, SizeHints.for_model(modules, cfg.lora.r))
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and "auto" not in json.dumps(ds)
    assert ds["bf16"]["enabled"] == (cfg.model.dtype == "bfloat16")
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 8
    # Every LoRA matrix stays resident, no base weight does (engine.zero3_auto_values).
    assert zero["stage3_param_persistence_threshold"] >= cfg.lora.r * max(max(s) for s in modules.shapes.values())
    assert zero["stage3_param_persistence_threshold"] < min(i * o for i, o in modules.shapes.values())


@pytest.mark.parametrize("recipe", RECIPES, ids=_recipe_id)
def test_recipe_header_says_how_to_launch_on_what_hardware_in_how_much_memory(recipe):
    from loradrop_ds.config import load_config

    header = _header(recipe)
    assert re.search(r"^Launch\b", header, re.M), f"{recipe.name}: no 'Launch' line in the header"
    assert re.search(r"^Hardware\b", header, re.M), f"{recipe.name}: no 'Hardware' line in the header"
    memory = re.search(r"(memory|RAM)[^\n]*?\d+(\.\d+)?\s*GI?B|\d+(\.\d+)?\s*GI?B[^\n]*?(memory|RAM)", header, re.I)
    assert memory, f"{recipe.name}: the header gives no expected memory (a figure in GB or GiB next to memory/RAM)"

    # Every command the header gives runs this recipe (or, for the default, no --config)
    # with overrides that validate and files that exist.
    commands = [line for line in header.replace("\\\n", " ").splitlines() if "launch/" in line]
    commands = [re.sub(r"^.*?:\s+(?=(deepspeed|torchrun|sbatch|python)\b)", "", c).strip() for c in commands]
    commands = [re.sub(r"^or:\s+", "", c) for c in commands]
    commands = [c.split("  (")[0].split("  #")[0] for c in commands]
    assert commands, f"{recipe.name}: no launch command in the header"
    rel = recipe.relative_to(REPO).as_posix()
    for command in commands:
        words = shlex.split(command)
        assert words[0] in ("deepspeed", "torchrun", "sbatch", "python"), f"{recipe.name}: {command}"
        for word in words:  # launch/hostfile is the user's copy of launch/hostfile.example
            assert not word.startswith("launch/") or (REPO / word).is_file() or (REPO / f"{word}.example").is_file(), \
                f"{recipe.name}: {word} does not exist"
        script = next(w for w in words if w in ("launch/train.py", "launch/slurm_train.sh", "launch/plan.py"))
        rest = words[words.index(script) + 1:]
        if script == "launch/slurm_train.sh":  # RECIPE [dotted.key=value ...]
            config, overrides = rest[0], rest[1:]
        else:
            config = rest[rest.index("--config") + 1] if "--config" in rest else None
            overrides = [w for w in rest if "=" in w and not w.startswith("-")]
        assert config == rel or (config is None and recipe.name == "default.yaml"), f"{recipe.name}: {command}"
        cfg = load_config(REPO / rel, overrides)
        assert (REPO / cfg.deepspeed).is_file(), f"{recipe.name}: {command}"


# ------------------------------------------------- the twins, with and without recompute


def twin_architecture(real: dict) -> dict:
    """A 4-layer LLaMA with the real one's structure: heads per KV head, MLP ratio, tied
    embeddings, RoPE base, norm eps. Head size 16: 3/1, 4/4 and 8/1 heads give hidden sizes
    48 (SmolLM2), 64 (Llama-2-7B and 13B) and 128 (Llama-3-70B)."""
    group = real["num_attention_heads"] // real["num_key_value_heads"]
    kv_heads = 1 if group > 1 else 4
    heads = group * kv_heads
    hidden = heads * TWIN_HEAD_DIM
    return dict(hidden_size=hidden, intermediate_size=round(hidden * real["intermediate_size"] / real["hidden_size"]),
                num_hidden_layers=TWIN_LAYERS, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=real["max_position_embeddings"], rope_theta=real["rope_theta"],
                rms_norm_eps=real["rms_norm_eps"], tie_word_embeddings=real["tie_word_embeddings"])


def make_twin_model(out_dir: Path, tokenizer_dir: Path, real: dict) -> Path:
    """The twin's random fp32 weights, with the tiny test tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    out_dir.mkdir(parents=True)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.name == "special_tokens_map.json"):
            shutil.copy(f, out_dir / f.name)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    arch = twin_architecture(real)
    config = _llama_config({**arch, "vocab_size": len(tokenizer)})
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def twin_rows(cfg, count: int) -> list[dict]:
    """``count`` WordNet rows in the columns the recipe's templates read."""
    from loradrop_ds.data import template_fields

    rows = [json.loads(line) for line in WORDNET_TRAIN.read_text().splitlines()[:count]]
    fields = set(template_fields(cfg.data.prompt_template) + template_fields(cfg.data.response_template))
    if fields <= set(rows[0]):
        return rows
    assert fields <= {"instruction", "input", "output"}, f"no twin data for the columns {sorted(fields)}"
    return [{"instruction": "Name the category of this definition.", "input": r["definition"],
             "output": r["category"]} for r in rows]


def twin_settings(cfg) -> tuple[int, int, int]:
    """``(micro_batch_size, grad_accum, rows)``: the recipe's batch halved (accumulation
    capped at 2, still > 1 where the recipe accumulates), and exactly one pass over the
    rows in the sampling stage."""
    micro = max(1, cfg.train.micro_batch_size // 2)
    accum = min(cfg.train.grad_accum, 2)
    return micro, accum, SAMPLING_STEPS * micro * accum * WORLD


def expected_sampling_tokens(cfg, model_dir: Path, rows: list[dict]) -> int:
    """Real tokens of one pass over ``rows`` (the whole sampling subset at sample_ratio 1),
    counted here from the tokenizer: prompt (with BOS) + response + EOS, truncated to
    data.max_seq_len. Padding is not a token."""
    from transformers import AutoTokenizer

    assert cfg.data.format == "template" and not cfg.data.packing, \
        f"count the tokens of data.format={cfg.data.format}, packing={cfg.data.packing} here"
    tok = AutoTokenizer.from_pretrained(model_dir)
    total = 0
    for row in rows:
        prompt = tok(cfg.data.prompt_template.format(**row), add_special_tokens=True)["input_ids"]
        response = tok(cfg.data.response_template.format(**row), add_special_tokens=False)["input_ids"]
        total += min(len(prompt) + len(response) + 1, cfg.data.max_seq_len)
    return total


@pytest.fixture(scope="module")
def twins(tiny_model, tmp_path_factory):
    """Per recipe: the twin's config, the real architecture, the twin model directory, its
    training rows and the overrides that make the recipe its twin."""
    from loradrop_ds.config import load_config

    root = tmp_path_factory.mktemp("twins")
    out = {}
    for recipe in RECIPES:
        cfg = load_config(recipe)
        model_dir = make_twin_model(root / recipe.stem / "model", tiny_model, REAL_MODELS[cfg.model.path])
        micro, accum, count = twin_settings(cfg)
        rows = twin_rows(cfg, count)
        train_file = root / recipe.stem / "train.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        overrides = [f"model.path={model_dir}", f"data.train_file={train_file}", "data.eval_file=null",
                     "loradrop.sample_ratio=1.0", f"loradrop.sampling_steps={SAMPLING_STEPS}", "train.max_steps=1",
                     f"train.micro_batch_size={micro}", f"train.grad_accum={accum}", "train.log_every=1",
                     "resume=never"]
        out[recipe.stem] = dict(recipe=recipe, cfg=load_config(recipe, overrides), real=REAL_MODELS[cfg.model.path],
                                model=model_dir, rows=rows, overrides=overrides)
    return out


def test_twins_keep_the_structure_of_the_real_models(twins):
    from transformers import AutoConfig

    for name, twin in twins.items():
        real = twin["real"]
        config = AutoConfig.from_pretrained(twin["model"])
        group = real["num_attention_heads"] // real["num_key_value_heads"]
        assert config.num_attention_heads // config.num_key_value_heads == group, name
        assert (config.num_key_value_heads < config.num_attention_heads) == (group > 1), name
        assert config.tie_word_embeddings == real["tie_word_embeddings"], name
        assert config.intermediate_size / config.hidden_size == pytest.approx(
            real["intermediate_size"] / real["hidden_size"], rel=0.02), name
        assert _rope_theta(config) == real["rope_theta"], name
        assert config.max_position_embeddings == real["max_position_embeddings"], name
    # By hand, so a change to twin_architecture is seen: (heads, KV heads, hidden, MLP).
    dims = {name: (c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.intermediate_size)
            for name, c in ((n, AutoConfig.from_pretrained(t["model"])) for n, t in twins.items())}
    assert dims == {"default": (3, 1, 48, 128), "smollm2_plain_lora": (3, 1, 48, 128),
                    "smollm2_loraprune": (3, 1, 48, 128), "smollm2_allora": (3, 1, 48, 128),
                    "llama2_7b_loradrop": (4, 4, 64, 172), "llama2_13b_loradrop": (4, 4, 64, 173),
                    "llama3_70b_loradrop": (8, 1, 128, 448)}


def _twin_argv(twin: dict, out_dir: Path, checkpointing: bool) -> list[str]:
    return ["--config", str(twin["recipe"]), *twin["overrides"], f"output_dir={out_dir}",
            f"model.gradient_checkpointing={str(checkpointing).lower()}"]


@pytest.fixture(scope="module")
def twin_runs(twins, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per recipe: its twin trained with and without activation checkpointing. All twelve
    runs in one set of rank processes (``run_ranks_many``): each run seeds and releases its
    own state, and what is compared is what each wrote."""
    root = tmp_path_factory.mktemp("twin_runs")
    dirs = {name: (root / name / "checkpointing", root / name / "plain") for name in twins}
    run_ranks_many([_twin_argv(twins[name], out, on) for name, pair in dirs.items()
                    for out, on in zip(pair, (True, False), strict=True)], root / "logs", nproc=WORLD)
    return dirs


def _losses(run: Path, stage: str) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["stage"] == stage and "loss" in r]


def _rank_stats(run: Path) -> list[dict[str, torch.Tensor]]:
    """Each rank's own (layer, module) sums and token counts, before the all-reduce, from
    the checkpoint written at the end of the sampling stage."""
    (ckpt,) = sorted((run / "checkpoints").glob(f"sampling-step{SAMPLING_STEPS:07d}"))
    return [load_file(ckpt / "stats" / f"rank{r}.safetensors") for r in range(WORLD)]


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


# Recomputation repeats the same forward on the same inputs, with the dropout RNG restored
# (torch.utils.checkpoint, preserve_rng_state): fp32 and bf16 alike agree to the last bit on
# CPU (measured: 0.0). 1e-6 relative leaves room for a kernel that reorders a sum, and is
# far below what counting recomputed forwards does: every LoRA of a layer but the last
# (down_proj; non-reentrant recomputation stops once the saved tensors are rebuilt) counted
# twice, tokens and sums alike.
RTOL = 1e-6


@pytest.mark.parametrize("recipe", RECIPES, ids=_recipe_id)
def test_twin_statistics_are_the_same_with_activation_checkpointing(twins, twin_runs, recipe):
    twin = twins[recipe.stem]
    cfg = twin["cfg"]
    on, off = twin_runs[recipe.stem]
    assert yaml.safe_load((on / "config.yaml").read_text())["model"]["gradient_checkpointing"] is True

    # Whole-run equality: every step's loss in both stages, and the trained adapter.
    for stage in ("sampling", "main") if cfg.loradrop.enabled else ("main",):
        steps = SAMPLING_STEPS if stage == "sampling" else cfg.train.max_steps
        a, b = _losses(on, stage), _losses(off, stage)
        assert len(a) == len(b) == steps and all(math.isfinite(x) for x in a), (stage, a, b)
        assert a == pytest.approx(b, rel=RTOL, abs=0), (stage, a, b)
    adapter_on = load_file(on / "adapter" / "adapter_model.safetensors")
    adapter_off = load_file(off / "adapter" / "adapter_model.safetensors")
    assert adapter_on.keys() == adapter_off.keys()
    for key in adapter_on:
        torch.testing.assert_close(adapter_on[key], adapter_off[key], rtol=RTOL, atol=1e-12)
    if not cfg.loradrop.enabled:
        assert not (on / "selection.json").exists()  # plain LoRA: no sampling stage, no statistics
        return

    sel_on = json.loads((on / "selection.json").read_text())
    sel_off = json.loads((off / "selection.json").read_text())
    # The statistics: every (layer, module) sum on every rank, and what selection.json holds.
    for rank_on, rank_off in zip(_rank_stats(on), _rank_stats(off), strict=True):
        assert torch.equal(rank_on["token_counts"], rank_off["token_counts"])
        assert (rank_off["sq_norm_sums"] > 0).all()  # B left zero after the first step: the sums mean something
        assert _max_rel(rank_on["sq_norm_sums"], rank_off["sq_norm_sums"]) <= RTOL
    assert sel_on["token_count"] == sel_off["token_count"]
    assert sel_on["raw_sums"] == pytest.approx(sel_off["raw_sums"], rel=RTOL, abs=0)
    assert sel_on["importance"] == pytest.approx(sel_off["importance"], rel=RTOL, abs=0)
    assert sel_on["kept"] == sel_off["kept"] and sel_on["threshold"] == cfg.loradrop.threshold

    # Every real token is counted once per LoRA module: one pass over the rows (sample_ratio 1,
    # steps x micro-batch x accumulation x ranks rows), counted here from the tokenizer.
    # Counted twice under recomputation, or with the padding, this is off.
    expected = expected_sampling_tokens(cfg, twin["model"], twin["rows"])
    assert len(twin["rows"]) == SAMPLING_STEPS * cfg.train.micro_batch_size * cfg.train.grad_accum * WORLD
    assert sel_on["token_count"] == expected
    total = sum(r["token_counts"] for r in _rank_stats(on))
    assert torch.equal(total, torch.full_like(total, float(expected)))
