"""The merged export, shard by shard: its weights equal peft's own merge
(``PeftModel.from_pretrained(base, adapter).merge_and_unload()``) of a LoRA-drop adapter
whose shared LoRA is written under several layers, for a single-file and a sharded base,
fp32 and bf16, Linear and GPT-2 Conv1D layers; the merged model gives the peft model's
logits; bad bases and adapters are refused by name with nothing written; and merging a
random LLaMA of a few hundred MB holds about one shard in memory, not the model."""

import json
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import REPO
from loradrop_ds.export import ExportError, export

sys.path.insert(0, str(REPO / "bench"))
from merge_memory import make_random_llama, measure_merge, write_loradrop_run  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj"]
KEPT = [2]  # layers 0, 1 and 3 of the 4-layer tiny model share one LoRA per module type
# fp32: peft and the export run the same float32 operations; the tolerance only allows for a
# BLAS that rounds B @ A differently for differently aligned inputs (in practice: bitwise equal).
FP32_TOL = {"rtol": 0.0, "atol": 1e-6}


def merged_tensors(out_dir):
    tensors = {}
    for path in sorted(out_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def load_file_tensor(model_dir, name):
    """One tensor of a model directory, from whichever safetensors file holds it."""
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(name)


def peft_merged_state_dict(base_dir, adapter_dir):
    """The reference: plain transformers + peft, the whole model in memory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()


def resave(model_dir, dest, max_shard_size, dtype=torch.float32):
    """A copy of the model saved as ``dtype`` safetensors shards of ``max_shard_size``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).save_pretrained(dest, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(dest)
    return dest


def assert_nothing_written(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize("layout, out_shard_size", [("single-file", "5GB"), ("sharded", "100KB")])
def test_merged_equals_peft_merge_and_gives_the_peft_logits(tiny_model, tmp_path, layout, out_shard_size):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = tiny_model if layout == "single-file" else resave(tiny_model, tmp_path / "base", "100KB")
    assert (base_dir / "model.safetensors").is_file() == (layout == "single-file")
    run = write_loradrop_run(base_dir, tmp_path / "run", TARGETS, KEPT, r=4, alpha=16)  # scaling 4
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.{}.self_attn.q_proj.lora_A.weight"
    assert torch.equal(adapter[key.format(0)], adapter[key.format(3)])  # the shared LoRA, under each user
    assert not torch.equal(adapter[key.format(0)], adapter[key.format(2)])  # a kept one

    out = export(run, tmp_path / "merged", "merged", max_shard_size=out_shard_size)

    got = merged_tensors(out)
    want = peft_merged_state_dict(base_dir, run / "adapter")
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(got[name], want[name], **FP32_TOL, msg=name)
    changed = [n for n in got if not torch.equal(got[n], load_file_tensor(base_dir, n))]
    assert len(changed) == len(TARGETS) * 4  # every targeted weight, and only those, moved

    if out_shard_size == "5GB":
        assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
        assert not (out / "model.safetensors.index.json").exists()
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(out.glob("model-*.safetensors"))
        assert len(files) >= 3 and set(index["weight_map"].values()) == {p.name for p in files}
        assert index["weight_map"].keys() == got.keys()
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                assert f.metadata() == {"format": "pt"}
                assert all(index["weight_map"][k] == path.name for k in f.keys())
    assert (out / "config.json").read_bytes() == (base_dir / "config.json").read_bytes()
    assert AutoTokenizer.from_pretrained(out)("a dog")["input_ids"]

    ids = torch.tensor([[1, 37, 52, 9, 140, 77, 3, 210], [1, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run / "adapter").eval()
        peft_logits = peft_model(input_ids=ids).logits
    # x (W + s B A) against x W + s (x A) B: the same sum in another order, fp32 rounding apart.
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-5, atol=1e-5)


def test_bf16_base_with_rslora_and_alpha_pattern(tiny_model, tmp_path):
    """A bf16 base with an fp32 adapter (as bf16 runs save it): the delta is computed in
    fp32 and each weight rounded to bf16 once, as peft's merge does; the scaling follows
    use_rslora and alpha_pattern."""
    base_dir = resave(tiny_model, tmp_path / "base", "150KB", dtype=torch.bfloat16)
    run = write_loradrop_run(base_dir, tmp_path / "run", TARGETS, KEPT, r=4, alpha=8, use_rslora=True,
                             alpha_pattern={"v_proj": 3})
    out = export(run, tmp_path / "merged", "merged", max_shard_size="150KB")
    got = merged_tensors(out)
    want = peft_merged_state_dict(base_dir, run / "adapter")
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == torch.bfloat16, name
        # One bf16 step (2^-8 relative) allows a differently rounded fp32 delta to flip the last bit.
        torch.testing.assert_close(got[name], want[name], rtol=2**-8, atol=1e-6, msg=name)
    # ... but only rarely (in practice never): rounding the delta to bf16 before adding it, or
    # rounding twice, leaves 10-30% of the elements one step off.
    equal = sum(int((got[n] == want[n]).sum()) for n in want) / sum(t.numel() for t in want.values())
    assert equal >= 0.999


def write_plain_lora_run(base_dir, run_dir, tokenizer_dir, target_modules):
    """A run directory with a plain peft LoRA (random A and B) on ``base_dir``."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=12, target_modules=target_modules, fan_in_fan_out=True))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / 4)
    model.save_pretrained(run_dir / "adapter")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(base_dir),
                                                                   "tokenizer": str(tokenizer_dir)}}))
    return run_dir


def test_conv1d_layers_are_merged_transposed_as_peft_does(tiny_model, tmp_path):
    """GPT-2 stores its Conv1D weights [in, out]; peft transposes B @ A for them
    (fan_in_fan_out). c_proj is square in attention, so only the layer type can tell."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=600, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                               eos_token_id=2)).save_pretrained(tmp_path / "gpt2")
    run = write_plain_lora_run(tmp_path / "gpt2", tmp_path / "run", tiny_model, ["c_attn", "c_proj"])
    out = export(run, tmp_path / "merged", "merged")
    got = merged_tensors(out)
    want = peft_merged_state_dict(tmp_path / "gpt2", run / "adapter")
    for name in got:
        torch.testing.assert_close(got[name], want[name], **FP32_TOL, msg=name)
    assert not torch.equal(got["transformer.h.0.attn.c_proj.weight"],
                           load_file_tensor(tmp_path / "gpt2", "transformer.h.0.attn.c_proj.weight"))


@pytest.fixture(scope="module")
def sharded_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge_errors")
    base_dir = resave(tiny_model, tmp / "base", "100KB")
    return base_dir, write_loradrop_run(base_dir, tmp / "run", TARGETS, KEPT)


def copy_run(run, dest, base_dir=None, drop_keys=(), add_keys=None):
    """A copy of ``run`` pointing at ``base_dir``, its adapter without ``drop_keys`` and with ``add_keys``."""
    import yaml

    shutil.copytree(run, dest)
    if base_dir is not None:
        config = yaml.safe_load((dest / "config.yaml").read_text())
        config["model"]["path"] = str(base_dir)
        (dest / "config.yaml").write_text(yaml.safe_dump(config))
    path = dest / "adapter" / "adapter_model.safetensors"
    adapter = {k: v for k, v in load_file(path).items() if k not in drop_keys}
    save_file({**adapter, **(add_keys or {})}, path)
    return dest


def test_a_pickled_base_is_refused_without_being_loaded(sharded_run, tmp_path):
    base_dir, run = sharded_run
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy2(base_dir / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not a pickle: loading it would fail differently")
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"PyTorch pickle weights \(pytorch_model.bin\).*safetensors only.*Convert"):
        export(run, out, "merged", base_model=str(pickled))
    assert_nothing_written(out)


def test_a_weight_the_adapter_targets_but_the_base_lacks_is_named(sharded_run, tmp_path):
    base_dir, run = sharded_run
    missing = "model.layers.1.self_attn.v_proj.weight"
    holed = tmp_path / "holed"
    shutil.copytree(base_dir, holed)
    index = json.loads((holed / "model.safetensors.index.json").read_text())
    shard = holed / index["weight_map"].pop(missing)
    save_file({k: v for k, v in load_file(shard).items() if k != missing}, shard, metadata={"format": "pt"})
    (holed / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    # The adapter's key for it lands on nothing in the base.
    with pytest.raises(ExportError, match=r"adapter key base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_A"
                                          r"\.weight targets model\.layers\.1\.self_attn\.v_proj\.weight, which is not"):
        export(copy_run(run, tmp_path / "run", base_dir=holed), out, "merged")
    # Without the adapter's keys for it, the base still lacks a weight the adapter's target_modules select.
    keys = [f"base_model.model.model.layers.1.self_attn.v_proj.lora_{ab}.weight" for ab in "AB"]
    with pytest.raises(ExportError, match=rf"the adapter targets {missing} .*does not hold it"):
        export(copy_run(run, tmp_path / "run2", base_dir=holed, drop_keys=keys), out, "merged")
    assert_nothing_written(out)


def test_adapter_keys_that_fit_no_base_weight_or_leave_one_out_are_named(sharded_run, tmp_path):
    _, run = sharded_run
    out = tmp_path / "out"
    stray = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"  # the tiny model has 4 layers
    with pytest.raises(ExportError, match=rf"adapter key {stray.replace('.', '[.]')} targets "
                                          r"model\.layers\.7\.self_attn\.q_proj\.weight, which is not in the base"):
        export(copy_run(run, tmp_path / "stray", add_keys={stray: torch.zeros(4, 64)}), out, "merged")
    gone = "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"
    with pytest.raises(ExportError, match=rf"the adapter has no {gone.replace('.', '[.]')}"):
        export(copy_run(run, tmp_path / "gone", drop_keys=[gone]), out, "merged")
    with pytest.raises(ExportError, match="--max-shard-size 5 gigabytes"):
        export(run, out, "merged", max_shard_size="5 gigabytes")
    assert_nothing_written(out)


def test_merging_holds_about_one_output_shard_not_the_model(tmp_path):
    """A random fp32 LLaMA of 380 MB in base shards of at most 100 MB, merged in a fresh
    process into shards of at most 48 MB: its peak RSS over its RSS after imports stays
    below the largest output shard + the adapter + one fp32 delta of the largest targeted
    weight + 16 MB of slack, and far below the model's size. The base's own sharding does
    not count: a reader that memory-maps the base keeps a whole base shard resident (161 MB).

    The child's glibc is told to give every allocation above 128 KiB its own mapping
    (``MALLOC_MMAP_THRESHOLD_``), so freed tensors go back to the system at once and the
    peak measures what the merge holds, not the heap's policy: by default this model's
    tensors (2-12 MB) stay below glibc's adaptive threshold, and the heap keeps 20-35 MB
    that the next shard's tensors do not fit into (``bench/merge_memory.py`` measures that
    default). Measured here: 74 MB, 10 MB over the first three terms (the weightless model
    skeleton, the tokenizer, Python objects); reading every base shard at once, 409 MB."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = make_random_llama(tmp_path / "base", num_layers=8, hidden=1024, shard_size="100MB")
    run = write_loradrop_run(base, tmp_path / "run", targets, kept_layers=[4, 5, 6, 7], r=8)
    out = tmp_path / "merged"
    result = measure_merge("shard_by_shard", run, out, "48MB", extra_env={"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})

    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    base_shard_bytes = max(p.stat().st_size for p in base.glob("*.safetensors"))
    out_shard_bytes = max(p.stat().st_size for p in out.glob("*.safetensors"))
    adapter_bytes = (run / "adapter" / "adapter_model.safetensors").stat().st_size
    largest_delta_bytes = 1024 * (1024 * 11 // 4) * 4  # gate/up/down_proj, fp32
    slack = 16 * 10**6
    assert model_bytes > 350 * 10**6 and base_shard_bytes > 90 * 10**6 and out_shard_bytes <= 48 * 10**6
    peak = result["peak_rss_over_imports_bytes"]
    assert peak < out_shard_bytes + adapter_bytes + largest_delta_bytes + slack, result
    assert peak < model_bytes / 4, result
