"""Bad input of every class is one line, exit code 2, before any weights load, and leaves
every file that existed untouched (issue 8 item 1, train side). A few real CLI runs on one
rank; the rest on the checking functions themselves."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import typing

import pytest
import torch

from conftest import REPO, run_ranks_many
from loradrop_ds import config as config_lib
from loradrop_ds.config import ConfigError, load_config, parse_overrides, template_problem
from loradrop_ds.data import DataError, check_utf8, load_table, tokenize_table
from loradrop_ds.importance import ImportanceStats, SelectionError, compute_selection
from loradrop_ds.model import ModelError, check_architecture, check_tokenizer_fits, check_weight_files

TRAIN = REPO / "launch" / "train.py"
ROWS = [{"definition": f"definition number {i}", "category": "noun.animal" if i % 2 else "noun.plant"} for i in range(8)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------ the real CLI


def _cli_case(case, tmp_path, tiny_model):
    """(extra overrides or --config, expected text in the one error line) for ``case``."""
    if case == "recipe_with_tab":
        recipe = tmp_path / "tab.yaml"
        recipe.write_text("train:\n  lr: 0.01\n\tmax_steps: 3\n")
        return ["--config", str(recipe)], f"{recipe}:3: not valid YAML"
    if case == "infinite_lr":
        return ["train.lr=.inf"], "train.lr: inf is not a finite number"
    if case == "positional_template":
        return ["data.prompt_template='Q: {} A:'"], "data.prompt_template='Q: {} A:' cannot be rendered: positional"
    if case == "data_not_utf8":
        bad = _jsonl(tmp_path / "latin1.jsonl", ROWS)
        bad.write_bytes(bad.read_bytes().replace(b"number 5", b"num\xe9ro 5"))
        return [f"data.train_file={bad}"], f"data.train_file={bad}:6: byte 0xe9 is not UTF-8"
    if case == "row_lacks_column":  # row 5 lacks the key entirely (JSONL reads it as null)
        rows = [dict(r) for r in ROWS * 8]
        del rows[5]["category"]
        return [f"data.train_file={_jsonl(tmp_path / 'gap.jsonl', rows)}"], "row 5 has no value in column 'category'"
    if case == "deepspeed_not_object":
        ds = tmp_path / "list.json"
        ds.write_text("[1, 2]")
        return [f"deepspeed={ds}"], f"deepspeed={ds}: expected a JSON object of settings, got list"
    if case == "liger_on_cpu":  # Liger's kernels are Triton GPU kernels: refused before anything is read
        return ["model.liger=true"], "model.liger=true needs a CUDA device (Liger's kernels are Triton GPU kernels)"
    if case == "leaf_modules_with_shared_lora":  # LoRA-drop ties a shared LoRA; leaf modules lose its gradient
        ds = json.loads((REPO / "ds_configs" / "zero3_tiny.json").read_text())
        ds["zero_optimization"]["leaf_module"] = {"classes": ["LlamaDecoderLayer"]}
        path = tmp_path / "leaf.json"
        path.write_text(json.dumps(ds))
        return [f"deepspeed={path}"], f"deepspeed={path}: zero_optimization.leaf_module makes DeepSpeed reduce"
    if case == "encoder_decoder":
        from transformers import T5Config

        t5 = tmp_path / "t5"
        T5Config(num_layers=2, d_model=32, d_ff=64, num_heads=2, vocab_size=600).save_pretrained(t5)
        return [f"model.path={t5}", f"model.tokenizer={tiny_model}"], f"model.path={t5} is an encoder-decoder model"
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    if case == "truncated_weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
        return [f"model.path={model}"], "weight file model.safetensors is"
    if case == "tokenizer_too_big":
        config = json.loads((model / "config.json").read_text())
        config["vocab_size"] = 500  # the tokenizer has 600
        (model / "config.json").write_text(json.dumps(config))
        return [f"model.path={model}"], "has 600 tokens but the model's embeddings have 500 rows"
    raise AssertionError(case)


CLI_CASES = ["recipe_with_tab", "infinite_lr", "positional_template", "data_not_utf8", "row_lacks_column",
             "deepspeed_not_object", "liger_on_cpu", "leaf_modules_with_shared_lora", "encoder_decoder", "truncated_weights",
             "tokenizer_too_big"]


BEFORE = {"notes.txt": b"a day of 64 GPUs\n", "eval.csv": b"step,acc\n50,0.82\n"}


@pytest.fixture(scope="module")
def cli_case_runs(tiny_model, tmp_path_factory) -> dict:
    """Each case's one-process run (all in one process: ``run_ranks_many``) into an
    output_dir that already holds files of the user's (``BEFORE``); (run, output_dir,
    expected text in the one error line) per case."""
    root = tmp_path_factory.mktemp("cli_cases")
    runs, outs, expected = [], {}, {}
    for case in CLI_CASES:
        out = outs[case] = root / case / "run"
        out.mkdir(parents=True)
        for name, content in BEFORE.items():  # the CLI must neither change them nor add any
            (out / name).write_bytes(content)
        extra, expected[case] = _cli_case(case, root / case, tiny_model)
        args = [f"model.path={tiny_model}", f"output_dir={out}", "deepspeed=ds_configs/zero3_tiny.json",
                "loradrop.sampling_steps=2", "loradrop.sample_ratio=0.05", "train.max_steps=2", "train.warmup_steps=1",
                "train.micro_batch_size=4", "data.max_eval_examples=8", "lora.target_modules=[q_proj,v_proj]"]
        runs.append(extra + args if extra[0] == "--config" else args + extra)
    procs = run_ranks_many(runs, root / "logs", nproc=1, check=False)
    return {case: (proc, outs[case], expected[case]) for case, proc in zip(CLI_CASES, procs, strict=True)}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_rejects_bad_input_in_one_line_and_changes_nothing(cli_case_runs, case):
    proc, out, expected = cli_case_runs[case]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == BEFORE


# ------------------------------------------------------------------------ recipes and overrides


@pytest.mark.parametrize("text, where, what", [
    ("seed: 1\ntrain:\n\tlr: 0.1\n", ":3:", "not tabs"),
    ("seed: 1\ntrain:\n  lr: [0.1,\n", ":4:", "not valid YAML"),
    ("seed: 1\ntrain:\n  lr: 0.1\n lora: {}\n", ":4:", "not valid YAML"),
    ("seed: 1\n# caf\xe9\n", ":2:", "byte 0xe9 is not UTF-8"),
])
def test_recipe_that_is_not_yaml_names_file_and_line(tmp_path, text, where, what):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert f"{recipe}{where}" in str(err.value) and what in str(err.value)


@pytest.mark.parametrize("override, what", [
    ("train.lr=[0.1,", "override 'train.lr=[0.1,': the value is not valid YAML (line 1"),
    ("data.prompt_template=Q: {} A:", "override 'data.prompt_template=Q: {} A:': the value is not valid YAML"),
    ("train.lr=0.1\udce9", "contains bytes that are not UTF-8"),  # what Python makes of a non-UTF-8 argv byte
    ("data.response_template= {category}", "data.response_template: expected str, got dict"),
])
def test_override_that_is_not_yaml_names_the_override(override, what):
    with pytest.raises(ConfigError) as err:
        parse_overrides([override]) and load_config(None, [override])
    assert what in str(err.value)
    str(err.value).encode("utf-8")  # printable: no lone surrogate in the message


def _float_settings():
    """Every float (or optional float) setting of the recipe, as a dotted key."""
    keys = []
    for group, group_type in typing.get_type_hints(config_lib.Config).items():
        hints = typing.get_type_hints(group_type) if dataclasses.is_dataclass(group_type) else {}
        for name, tp in hints.items():
            if tp is float or float in typing.get_args(tp):
                keys.append(f"{group}.{name}")
    return keys


def test_every_float_setting_is_covered():
    assert set(_float_settings()) == {
        "lora.alpha", "lora.dropout", "lora.allora_eta2", "loradrop.threshold", "loradrop.sample_ratio", "loradrop.sampling_lr",
        "loradrop.param_budget", "loradrop.auto_min_rank_correlation",
        "train.num_epochs", "train.lr", "train.min_lr_ratio", "train.weight_decay", "train.max_grad_norm",
        "train.peak_tflops", "data.eval_split_ratio", "dist.timeout_minutes", "prune.target_sparsity", "prune.start_fraction",
        "prune.end_fraction", "prune.ema", "prune.exempt_first_fraction"}


@pytest.mark.parametrize("key", _float_settings())
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "nan", "inf", "1e999"])
def test_non_finite_floats_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: .* is not a finite number"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_peak_that_is_not_positive_is_refused(value):
    with pytest.raises(ConfigError, match=r"^train.peak_tflops must be > 0 .* or null"):
        load_config(None, [f"train.peak_tflops={value}"])


def test_negative_weight_decay_is_refused():
    with pytest.raises(ConfigError, match="train.weight_decay must be >= 0"):
        load_config(None, ["train.weight_decay=-0.1"])


@pytest.mark.parametrize("template, what", [
    ("Q: {} A:", "positional field {}"),
    ("Q: {0} A:", "positional field {0}"),
    ("Q: {definition A:", "unbalanced braces"),
    ("Q: definition} A:", "unbalanced braces"),
    ("Q: {row.definition}", "attribute or index"),
    ("Q: {row[0]}", "attribute or index"),
    ("Q: {definition:{width}}", "nests a field"),
])
def test_templates_format_cannot_render_are_named(template, what):
    assert what in template_problem(template)
    for setting in ("prompt_template", "response_template"):
        with pytest.raises(ConfigError, match=rf"data.{setting}=.* cannot be rendered: .*{what[:8]}"):
            load_config(None, [f"data.{setting}={json.dumps(template)}"])


def test_good_templates_pass():
    for template in ("Definition: {definition}\nCategory:", " {category}", "{{literal}} {definition!r:>5}", "none"):
        assert template_problem(template) is None
    load_config(None, ["data.format=alpaca", "data.prompt_template='{}'"])  # unused by alpaca: not checked


# ------------------------------------------------------------------------ data


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 64, 1 << 20])
def test_data_file_not_utf8_names_file_and_line(tmp_path, chunk_size):
    path = tmp_path / "rows.jsonl"
    good = json.dumps({"definition": "caf\u00e9 \u4e2d\u6587", "category": "x"}) + "\n"
    path.write_bytes((good * 3).encode() + b'{"definition": "caf\xe9"}\n' + good.encode())
    with pytest.raises(DataError, match=rf"k={path}:4: byte 0xe9 is not UTF-8"):
        check_utf8(str(path), "k", chunk_size)
    path.write_bytes((good * 3).encode() + b'{"definition": "\xe4\xb8')  # cut inside a character, no newline
    with pytest.raises(DataError, match=rf"k={path}:4: byte 0xe4 is not UTF-8"):
        check_utf8(str(path), "k", chunk_size)
    path.write_bytes((good * 3).encode())
    check_utf8(str(path), "k", chunk_size)  # multi-byte characters across chunk ends are fine


def test_load_table_checks_utf8_before_datasets(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(b'[{"definition": "ok"},\n {"definition": "\xff"}]\n')
    with pytest.raises(DataError, match=rf"data.eval_file={path}:2: byte 0xff"):
        load_table(str(path), "data.eval_file")


@pytest.mark.parametrize("column", ["definition", "category"])
def test_every_row_needs_the_template_and_label_columns(tiny_model, tmp_path, column):
    """A later row lacking the key altogether (the first rows have it) is named by its index."""
    from transformers import AutoTokenizer

    rows = [dict(r) for r in ROWS]
    del rows[6][column]
    table = load_table(str(_jsonl(tmp_path / "rows.jsonl", rows)), "data.train_file")
    with pytest.raises(DataError, match=f"data.train_file: row 6 has no value in column '{column}'"):
        tokenize_table(table, AutoTokenizer.from_pretrained(tiny_model), config_lib.DataConfig(eval_file=None),
                       "data.train_file")


def test_a_format_spec_that_does_not_fit_a_cell_is_named(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    table = load_table(str(_jsonl(tmp_path / "rows.jsonl", ROWS)), "data.train_file")
    cfg = config_lib.DataConfig(eval_file=None, prompt_template="{definition:d}")  # 'd' on a string
    with pytest.raises(DataError, match="row 0: data.prompt_template cannot render this row"):
        tokenize_table(table, AutoTokenizer.from_pretrained(tiny_model), cfg, "data.train_file")


# ------------------------------------------------------------------------ models


def test_only_decoder_only_llama_family_models_are_accepted():
    from transformers import GPT2Config, LlamaConfig, T5Config

    check_architecture(LlamaConfig(), "m")
    with pytest.raises(ModelError, match=r"model.path=m is an encoder-decoder model \(t5"):
        check_architecture(T5Config(), "m")
    with pytest.raises(ModelError, match=r"model.path=m is a gpt2 model .* not a decoder-only LLaMA-family"):
        check_architecture(GPT2Config(), "m")


def test_liger_is_refused_where_its_kernels_cannot_run(monkeypatch):
    """model.liger=true: CUDA only, LLaMA's model type, SiLU-gated MLPs without biases, and
    liger-kernel importable, each refused in one line naming the fix; false checks nothing."""
    from transformers import LlamaConfig, Qwen2Config

    from loradrop_ds.config import ModelConfig
    from loradrop_ds.liger import check_liger

    on, off = ModelConfig(path="m", liger=True), ModelConfig(path="m")
    for device in ("cpu", "cuda"):
        check_liger(off, Qwen2Config(), device)
    with pytest.raises(ConfigError, match=r"^model.liger=true needs a CUDA device .* runs on cpu; set model.liger=false$"):
        check_liger(on, LlamaConfig(), "cpu")
    with pytest.raises(ConfigError, match=r"supports LLaMA-architecture models .* model.path=m is qwen2; set model.liger"):
        check_liger(on, Qwen2Config(), "cuda")
    with pytest.raises(ConfigError, match=r"needs hidden_act silu, and model.path=m has gelu; set model.liger=false"):
        check_liger(on, LlamaConfig(hidden_act="gelu"), "cuda")
    with pytest.raises(ConfigError, match=r"has no biases, and model.path=m has mlp_bias=true; set model.liger=false"):
        check_liger(on, LlamaConfig(mlp_bias=True), "cuda")
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # `import liger_kernel` now fails, installed or not
    with pytest.raises(ConfigError, match=r"needs the liger-kernel package \(ModuleNotFoundError: .*\): pip install "
                                          r"\"loradrop_ds\[liger\]\" .* or set model.liger=false$"):
        check_liger(on, LlamaConfig(), "cuda")


def test_weight_files_missing_or_truncated_are_named(tiny_model, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    whole = weights.read_bytes()
    check_weight_files(str(model))
    weights.write_bytes(whole[:-1])  # one byte short of the last tensor
    with pytest.raises(ModelError, match=rf"model.safetensors is {len(whole) - 1} bytes but its header says .* "
                                         rf"need {len(whole)}: truncated"):
        check_weight_files(str(model))
    weights.write_bytes(whole[:100])  # cut inside the header
    with pytest.raises(ModelError, match="its header alone needs .*: truncated"):
        check_weight_files(str(model))
    weights.write_bytes(whole[:4])
    with pytest.raises(ModelError, match="shorter than a safetensors header"):
        check_weight_files(str(model))
    n = int.from_bytes(whole[:8], "little")
    weights.write_bytes(whole[:8] + b"x" * n + whole[8 + n:])
    with pytest.raises(ModelError, match="not a safetensors header: corrupt"):
        check_weight_files(str(model))
    weights.unlink()
    with pytest.raises(ModelError, match=f"model.path={model} holds no weight files"):
        check_weight_files(str(model))
    # Sharded (no single model.safetensors, which transformers would load first): an index
    # naming a shard that is not there.
    (model / "model-00001-of-00002.safetensors").write_bytes(whole)
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelError, match=r"\['model-00002-of-00002.safetensors'\] named by model.safetensors.index.json"):
        check_weight_files(str(model))
    (model / "model.safetensors.index.json").unlink()
    (model / "model-00001-of-00002.safetensors").unlink()
    # PyTorch weights: a whole zip archive passes, a cut one is named.
    torch.save({"w": torch.zeros(64)}, model / "pytorch_model.bin")
    check_weight_files(str(model))
    archive = (model / "pytorch_model.bin").read_bytes()
    (model / "pytorch_model.bin").write_bytes(archive[: len(archive) // 2])
    with pytest.raises(ModelError, match="pytorch_model.bin is not a whole PyTorch weight file"):
        check_weight_files(str(model))
    check_weight_files("some-org/some-model")  # a hub id: transformers fetches and verifies it


def test_tokenizer_must_fit_the_embeddings(tiny_model):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = AutoConfig.from_pretrained(tiny_model)
    check_tokenizer_fits(tokenizer, config, "tok")
    config.vocab_size = len(tokenizer) - 1
    with pytest.raises(ModelError, match=f"the tokenizer at tok has {len(tokenizer)} tokens but the model's "
                                         f"embeddings have {len(tokenizer) - 1} rows"):
        check_tokenizer_fits(tokenizer, config, "tok")


# ------------------------------------------------------------------------ sampling statistics


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_non_finite_statistics_name_the_setting_to_change(bad, granularity):
    sums = torch.tensor([[1.0, 2.0], [bad, 1.0], [3.0, 4.0]], dtype=torch.float64)
    stats = ImportanceStats(["q_proj", "v_proj"], sums, torch.full_like(sums, 10.0))
    with pytest.raises(SelectionError) as err:
        compute_selection(stats, 0.9, granularity)
    message = str(err.value)
    assert "not finite" in message and "lower loradrop.sampling_lr" in message
    assert "model.dtype=bfloat16 or float32" in message
    assert ("items [1]" if granularity == "layer" else "items [2]") in message
