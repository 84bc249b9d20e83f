"""The pruned export (``--format pruned``) of a LoRAPrune run: the LoRA merged and the pruned
KV groups and MLP channels removed, loadable by plain ``AutoModelForCausalLM``.

The reference is independent of the export: plain transformers + peft on the unpruned base
(``merge_and_unload``), with forward pre-hooks that zero o_proj's input columns of the pruned
groups' query heads and down_proj's input channels of the pruned channels (what the masked
model computes). The run directory is written by hand: a random peft LoRA on every projection,
``config.yaml``, and ``prune/masks.safetensors`` + ``prune/prune.json`` as the training side
writes them."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import REPO, run_python
from loradrop_ds.export import export

EXPORT = REPO / "launch" / "export.py"
HIDDEN, HEADS, KV, INTER, LAYERS = 32, 4, 2, 48, 4
HEAD_DIM, N_REP = HIDDEN // HEADS, HEADS // KV
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _channels(seed, n):
    """``n`` distinct MLP channels, in a random order (so kept sets are not contiguous)."""
    return sorted(torch.randperm(INTER, generator=torch.Generator().manual_seed(seed))[:n].tolist())


# Kept KV groups and MLP channels per layer.
MASKS = {
    # every layer prunes alike (no exempt layer): physically smaller, no padding
    "uniform": [([1], _channels(1, 24)), ([0], _channels(2, 24)), ([1], _channels(3, 24)), ([0], _channels(4, 24))],
    # LoRAPrune's default: first layer and last layer exempt (full width), so the export is full width
    "exempt": [([0, 1], list(range(INTER))), ([1], _channels(5, 20)), ([0], _channels(6, 30)),
               ([0, 1], list(range(INTER)))],
    # no exempt layer, different kept counts: widths 2 groups / 30 channels, narrower layers padded
    "ragged": [([0, 1], _channels(7, 30)), ([1], _channels(8, 20)), ([0], _channels(9, 12)),
               ([1], _channels(10, 30))],
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tiny import make_tokenizer

    out = tmp_path_factory.mktemp("tok")
    make_tokenizer(out)
    return out


def make_base(tokenizer_dir, out, bias=False):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64,
                         attention_bias=bias, mlp_bias=bias, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if bias:  # nn.Linear biases start random already; make sure none is zero by chance
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base_dir(tokenizer_dir, tmp_path_factory):
    return make_base(tokenizer_dir, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def bias_base_dir(tokenizer_dir, tmp_path_factory):
    return make_base(tokenizer_dir, tmp_path_factory.mktemp("base_bias"), bias=True)


def write_masks(run, kept, exempt=()):
    prune = run / "prune"
    prune.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, (groups, channels) in enumerate(kept):
        attn, mlp = torch.zeros(KV, dtype=torch.uint8), torch.zeros(INTER, dtype=torch.uint8)
        attn[groups] = 1
        mlp[channels] = 1
        tensors[f"layers.{i}.attn"], tensors[f"layers.{i}.mlp"] = attn, mlp
    save_file(tensors, prune / "masks.safetensors")
    (prune / "prune.json").write_text(json.dumps({
        "exempt_layers": list(exempt), "target_sparsity": 0.5, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "head_dim": HEAD_DIM, "intermediate_size": INTER}))


def make_run(base, run, kept, exempt=()):
    """A run directory as the export reads it: adapter/ (random nonzero LoRA on every
    projection), config.yaml and prune/."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    model.save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"path": str(base)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS},
        "prune": {"target_sparsity": 0.5}}))
    write_masks(run, kept, exempt)
    return run


def masked_reference(base, run, kept):
    """Unpruned base + adapter, merged by peft, with the pruned units zeroed by pre-hooks."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      run / "adapter").merge_and_unload().eval()
    for layer, (groups, channels) in zip(model.model.layers, kept, strict=True):
        head_keep = torch.zeros(HEADS * HEAD_DIM)
        for h in range(HEADS):
            if h // N_REP in groups:  # repeat_kv: query head h reads KV head h // n_rep
                head_keep[h * HEAD_DIM:(h + 1) * HEAD_DIM] = 1
        chan_keep = torch.zeros(INTER)
        chan_keep[channels] = 1
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, k=head_keep: (args[0] * k,))
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, args, k=chan_keep: (args[0] * k,))
    return model


def written_units(kept_per_layer, n):
    """The units the documented scheme writes per layer, and which of them are padding:
    the kept ones plus the lowest-index pruned ones up to the widest layer's count."""
    width = max(len(k) for k in kept_per_layer)
    out = []
    for kept in kept_per_layer:
        pruned = [j for j in range(n) if j not in kept]
        pad = pruned[:width - len(kept)]
        out.append((sorted(kept + pad), set(pad)))
    return width, out


def exported_tensors(out):
    tensors = {}
    for path in out.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


def head_rows(groups):
    return [h * HEAD_DIM + d for g in groups for h in range(g * N_REP, (g + 1) * N_REP) for d in range(HEAD_DIM)]


def kv_rows(groups):
    return [g * HEAD_DIM + d for g in groups for d in range(HEAD_DIM)]


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("case, bias", [("uniform", False), ("exempt", False), ("ragged", False), ("ragged", True)])
def test_pruned_export_gives_the_masked_models_logits(case, bias, base_dir, bias_base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = bias_base_dir if bias else base_dir
    kept = MASKS[case]
    run = make_run(base, tmp_path / "run", kept)
    out = export(run, tmp_path / "pruned", "pruned")

    reference = masked_reference(base, run, kept)
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    unmasked = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        ids = torch.randint(3, pruned.config.vocab_size, (2, 12), generator=g)
        with torch.no_grad():
            want, got = reference(input_ids=ids).logits, pruned(input_ids=ids).logits
            assert (unmasked(input_ids=ids).logits - want).abs().max() > 1e-3  # the LoRA and masks matter
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- shapes


def test_uniform_masks_give_a_physically_smaller_model(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    kept = MASKS["uniform"]
    run = make_run(base_dir, tmp_path / "run", kept)
    out = export(run, tmp_path / "pruned", "pruned")
    config = AutoConfig.from_pretrained(out)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size) == \
        (N_REP, 1, HEAD_DIM, 24)
    assert json.loads((out / "config.json").read_text())["head_dim"] == HEAD_DIM  # written explicitly

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                       run / "adapter").merge_and_unload().state_dict()
    got = exported_tensors(out)
    assert got.keys() == merged.keys()
    q = N_REP * HEAD_DIM
    for i, (groups, channels) in enumerate(kept):
        p = f"model.layers.{i}."
        want = {"self_attn.q_proj": merged[p + "self_attn.q_proj.weight"][head_rows(groups)],
                "self_attn.k_proj": merged[p + "self_attn.k_proj.weight"][kv_rows(groups)],
                "self_attn.v_proj": merged[p + "self_attn.v_proj.weight"][kv_rows(groups)],
                "self_attn.o_proj": merged[p + "self_attn.o_proj.weight"][:, head_rows(groups)],
                "mlp.gate_proj": merged[p + "mlp.gate_proj.weight"][channels],
                "mlp.up_proj": merged[p + "mlp.up_proj.weight"][channels],
                "mlp.down_proj": merged[p + "mlp.down_proj.weight"][:, channels]}
        shapes = {"self_attn.q_proj": [q, HIDDEN], "self_attn.k_proj": [HEAD_DIM, HIDDEN],
                  "self_attn.v_proj": [HEAD_DIM, HIDDEN], "self_attn.o_proj": [HIDDEN, q],
                  "mlp.gate_proj": [24, HIDDEN], "mlp.up_proj": [24, HIDDEN], "mlp.down_proj": [HIDDEN, 24]}
        for module, tensor in want.items():
            assert list(got[p + module + ".weight"].shape) == shapes[module], module
            torch.testing.assert_close(got[p + module + ".weight"], tensor, rtol=0, atol=1e-6, msg=module)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.2.input_layernorm.weight"):
        assert torch.equal(got[name], merged[name])

    vocab = config.vocab_size
    per_layer = q * HIDDEN + 2 * HEAD_DIM * HIDDEN + HIDDEN * q + 3 * 24 * HIDDEN + 2 * HIDDEN
    params = 2 * vocab * HIDDEN + HIDDEN + LAYERS * per_layer
    assert sum(t.numel() for t in got.values()) == params
    assert sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters()) == params
    unpruned = 2 * vocab * HIDDEN + HIDDEN + LAYERS * (2 * HEADS * HEAD_DIM * HIDDEN + 2 * KV * HEAD_DIM * HIDDEN
                                                       + 3 * INTER * HIDDEN + 2 * HIDDEN)
    card = (out / "README.md").read_text()
    assert f"| physical (stored) | {params:,} " in card
    assert f"| non-zero (physical minus padding zeros) | {params:,} " in card  # no padding here
    assert f"| unpruned base | {unpruned:,} |" in card
    for i in range(LAYERS):
        assert f"| {i} | 1 of 1 written | 24 of 24 written |" in card


@pytest.mark.parametrize("case", ["exempt", "ragged"])
def test_padded_layers_are_zero_exactly_where_pruned(case, base_dir, tmp_path):
    from transformers import AutoConfig

    kept = MASKS[case]
    run = make_run(base_dir, tmp_path / "run", kept, exempt=[0, 3] if case == "exempt" else [])
    out = export(run, tmp_path / "pruned", "pruned")
    width_g, groups = written_units([k[0] for k in kept], KV)
    width_c, channels = written_units([k[1] for k in kept], INTER)
    assert (width_g, width_c) == ((2, INTER) if case == "exempt" else (2, 30))
    config = AutoConfig.from_pretrained(out)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size) == \
        (width_g * N_REP, width_g, HEAD_DIM, width_c)
    got = exported_tensors(out)
    base = load_file(base_dir / "model.safetensors")
    zeros = 0
    for i, ((written_g, pad_g), (written_c, pad_c)) in enumerate(zip(groups, channels, strict=True)):
        p = f"model.layers.{i}."
        q_zero = [r for r, g in enumerate(g for g in written_g for _ in range(N_REP * HEAD_DIM)) if g in pad_g]
        kv_zero = [r for r, g in enumerate(g for g in written_g for _ in range(HEAD_DIM)) if g in pad_g]
        c_zero = [r for r, c in enumerate(written_c) if c in pad_c]
        for name, dim, zero in (("self_attn.q_proj", 0, q_zero), ("self_attn.k_proj", 0, kv_zero),
                                ("self_attn.v_proj", 0, kv_zero), ("self_attn.o_proj", 1, q_zero),
                                ("mlp.gate_proj", 0, c_zero), ("mlp.up_proj", 0, c_zero),
                                ("mlp.down_proj", 1, c_zero)):
            w = got[p + name + ".weight"]
            want_shape = list(base[p + name + ".weight"].shape)
            want_shape[dim] = (width_c if name.startswith("mlp") else
                               width_g * (HEAD_DIM if name[-6] in "kv" else N_REP * HEAD_DIM))
            assert list(w.shape) == want_shape, (i, name)
            lines = w if dim == 0 else w.T
            is_zero = [bool((line == 0).all()) for line in lines]
            assert [r for r, z in enumerate(is_zero) if z] == zero, (i, name)  # zero exactly at the padding
            zeros += len(zero) * lines.shape[1]
        if case == "exempt" and i in (0, 3):
            assert not pad_g and not pad_c  # exempt layers are written whole
    physical = sum(t.numel() for t in got.values())
    card = (out / "README.md").read_text()
    assert f"| physical (stored) | {physical:,} " in card
    assert f"| non-zero (physical minus padding zeros) | {physical - zeros:,} " in card
    assert "widest layer" in card and "prune.exempt_first_fraction=0 prune.exempt_last=false" in card
    for i, (g, c) in enumerate(kept):
        assert f"| {i} | {len(g)} of {width_g} written | {len(c)} of {width_c} written |" in card


def test_tokenizer_and_model_card_are_in_the_export(base_dir, tmp_path):
    from transformers import AutoTokenizer

    run = make_run(base_dir, tmp_path / "run", MASKS["ragged"])
    out = export(run, tmp_path / "pruned", "pruned", max_shard_size="100KB")  # sharded, with an index
    text = "Definition: a small dog"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == AutoTokenizer.from_pretrained(base_dir)(text)["input_ids"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = exported_tensors(out)
    assert index["weight_map"].keys() == got.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    card = (out / "README.md").read_text()
    assert "pruned" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert "library_name: transformers" in card
    assert not list(tmp_path.glob(".pruned.tmp-*"))


# ----------------------------------------------------------------------------- errors


def _tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def _no_prune(run, base):
    shutil.rmtree(run / "prune")


def _wrong_shape(run, base):
    masks = load_file(run / "prune" / "masks.safetensors")
    masks["layers.2.mlp"] = torch.ones(INTER + 8, dtype=torch.uint8)
    save_file(masks, run / "prune" / "masks.safetensors")


def _missing_layer(run, base):
    masks = load_file(run / "prune" / "masks.safetensors")
    del masks["layers.3.attn"]
    save_file(masks, run / "prune" / "masks.safetensors")


def _wrong_heads(run, base):
    info = json.loads((run / "prune" / "prune.json").read_text())
    info["num_key_value_heads"] = 4
    (run / "prune" / "prune.json").write_text(json.dumps(info))


def _no_groups(run, base):
    write_masks(run, [MASKS["ragged"][0], ([], _channels(1, 10))] + MASKS["ragged"][2:])


def _no_channels(run, base):
    write_masks(run, MASKS["ragged"][:2] + [([0], [])] + MASKS["ragged"][3:])


def _not_llama(run, base):
    """The base's config says another architecture (its weights still LLaMA's)."""
    config = json.loads((base / "config.json").read_text())
    config["model_type"], config["architectures"] = "mistral", ["MistralForCausalLM"]
    (base / "config.json").write_text(json.dumps(config))


BAD = {
    "no prune": (_no_prune, ["without a prune: section", "--format merged"]),
    "mask shape": (_wrong_shape, ["layers.2.mlp", "shape [56]", "[48]"]),
    "mask missing": (_missing_layer, ["layers.3.attn", "another model"]),
    "prune.json heads": (_wrong_heads, ["num_key_value_heads", "another model"]),
    "no kept groups": (_no_groups, ["layer 1 keeps no KV groups"]),
    "no kept channels": (_no_channels, ["layer 2 keeps no MLP channels"]),
    "not llama": (_not_llama, ["model_type 'mistral'", "--format merged"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_prune_input_is_one_line_and_writes_nothing(case, base_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    run = make_run(base, tmp_path / "run", MASKS["ragged"])
    damage, words = BAD[case]
    damage(run, base)
    before = _tree(tmp_path)
    out = tmp_path / "new" / "export"
    proc = run_python([str(EXPORT), str(run), "--out", str(out), "--format", "pruned"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "new").exists()
    assert _tree(tmp_path) == before


def test_kept_heads_that_do_not_divide_hidden_are_widened_with_zero_groups(tokenizer_dir, tmp_path):
    """transformers refuses num_attention_heads that do not divide hidden_size. MHA with
    hidden 40 and 5 heads of 8: keeping 3 heads per layer must be written as 4 (one zero
    group) and still give the masked model's logits."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    hidden, heads, inter, layers, kept_heads = 40, 5, 48, 2, [0, 2, 3]
    base = tmp_path / "base"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                 max_position_embeddings=64, tie_word_embeddings=False)).save_pretrained(base)
    tok.save_pretrained(base)
    run = tmp_path / "run"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(base)}, "lora": {
        "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS}, "prune": {"target_sparsity": 0.4}}))
    (run / "prune").mkdir()
    attn = torch.zeros(heads, dtype=torch.uint8)
    attn[kept_heads] = 1
    save_file({f"layers.{i}.{k}": v.clone() for i in range(layers)
               for k, v in (("attn", attn), ("mlp", torch.ones(inter, dtype=torch.uint8)))},
              run / "prune" / "masks.safetensors")
    (run / "prune" / "prune.json").write_text(json.dumps({
        "exempt_layers": [], "target_sparsity": 0.4, "num_attention_heads": heads, "num_key_value_heads": heads,
        "head_dim": 8, "intermediate_size": inter}))
    out = export(run, tmp_path / "pruned", "pruned")
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert pruned.config.num_attention_heads == pruned.config.num_key_value_heads == 4
    assert hidden % pruned.config.num_attention_heads == 0
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                          run / "adapter").merge_and_unload().eval()
    keep = torch.zeros(hidden)
    for h in kept_heads:
        keep[h * 8:(h + 1) * 8] = 1
    for layer in reference.model.layers:
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: (args[0] * keep,))
    ids = torch.randint(3, len(tok), (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
