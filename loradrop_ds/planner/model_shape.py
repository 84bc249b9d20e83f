"""What the planner needs of the model: its shape, read from the config alone on the meta
device (no weights), and where that config comes from (a local copy, the hub cache, or the
shipped public values of the models the recipes name)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import ModelConfig
from ..model import BUILTIN_PREFIX, ModelError, builtin_model_dir, decoder_layers, load_model_config, module_info

# Public config.json values (huggingface.co/<id>/blob/main/config.json) of the models the
# recipes and the peft anchor name, used when the id is not in the local hub cache: the hub
# is often unreachable (and meta-llama repos are gated), and these values never change.
# Cross-checked: the parameter counts they give on the meta device are the published ones
# (Llama-2-7B 6,738,415,616; Llama-2-70B 68,976,648,192; Llama-3-70B 70,553,706,496).
# `torch_dtype` is the dtype of the stored weights (what rank 0 maps while loading).
_LLAMA2 = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "torch_dtype": "float16"}
_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
_LLAMA2_7B = {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32}
_LLAMA2_13B = {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
               "num_attention_heads": 40, "num_key_value_heads": 40}
_LLAMA2_70B = {**_LLAMA2, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8}
_LLAMA3_8B = {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8}
_LLAMA3_70B = {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8}
KNOWN_MODEL_CONFIGS: dict[str, dict] = {
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-7b-chat-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-13b-hf": _LLAMA2_13B,
    "meta-llama/Llama-2-13b-chat-hf": _LLAMA2_13B,
    "meta-llama/Llama-2-70b-hf": _LLAMA2_70B,
    "meta-llama/Llama-2-70b-chat-hf": _LLAMA2_70B,
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-70B": _LLAMA3_70B,
    "meta-llama/Meta-Llama-3-70B-Instruct": _LLAMA3_70B,
    # HuggingFaceTB/SmolLM2-135M-Instruct, for the builtin before its first conversion; the
    # converted copy is stored in fp32 (loradrop_ds.model.prepare_builtin_model).
    "builtin:smollm2-135m-instruct": {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": True, "torch_dtype": "float32",
    },
}


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a causal LM, read from a weightless (meta-device) copy."""

    name: str
    source: str  # where the config came from
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    param_numels: tuple[int, ...]  # every parameter once: a tied embedding / lm_head counts once
    layer_param_numels: tuple[int, ...]  # the parameters of the largest decoder layer
    target_shapes: dict[str, tuple[int, int]]  # LoRA target module -> (in_features, out_features)
    largest_weight_numel: int  # the largest linear weight of a decoder layer (sizes ZeRO-3 buffers)
    checkpoint_dtype: Optional[str] = None  # dtype of the stored weights, when the config says

    @property
    def total_params(self) -> int:
        return sum(self.param_numels)


def shape_from_model(model: torch.nn.Module, target_modules: list[str], name: str = "", source: str = "",
                     checkpoint_dtype: Optional[str] = None) -> ModelShape:
    """Read a ModelShape off a (meta-device) causal LM. ``named_parameters`` yields a tied
    embedding / lm_head pair once (torch de-duplicates shared parameters), as ZeRO-3
    partitions and the checkpoint stores it once."""
    modules = module_info(model, target_modules)  # also checks the targets exist in every layer
    config = model.config
    layers = decoder_layers(model)
    largest_layer = max(layers, key=lambda layer: sum(p.numel() for p in layer.parameters()))
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    tied = out_emb is not None and out_emb.weight is in_emb.weight
    vocab = int(out_emb.weight.shape[0]) if out_emb is not None else int(config.vocab_size)
    return ModelShape(
        name=name, source=source, num_layers=modules.num_layers, hidden_size=modules.hidden_size,
        intermediate_size=int(getattr(config, "intermediate_size", 4 * modules.hidden_size)),
        num_heads=heads, num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim, vocab_size=vocab, tied_embeddings=tied,
        param_numels=tuple(p.numel() for p in model.parameters()),
        layer_param_numels=tuple(p.numel() for p in largest_layer.parameters()),
        target_shapes=dict(modules.shapes), largest_weight_numel=modules.largest_weight_numel,
        checkpoint_dtype=checkpoint_dtype,
    )


def _config_dtype(model_config: Any) -> Optional[str]:
    value = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if value is None:
        return None
    return str(value).removeprefix("torch.")


def read_model_config(model_cfg: ModelConfig) -> tuple[Any, str]:
    """The transformers config of ``model.path`` and where it came from, without reading
    weights or downloading anything a shipped copy can answer.

    Order: the converted builtin or a local directory (through ``load_model_config``); the
    local hub cache; the shipped public values (``KNOWN_MODEL_CONFIGS``); the hub itself
    (unknown ids only; a failure there is a ModelError naming the path).
    """
    from transformers import AutoConfig

    path = model_cfg.path
    if path.startswith(BUILTIN_PREFIX):
        if (builtin_model_dir(path[len(BUILTIN_PREFIX):]) / "config.json").is_file():
            return load_model_config(model_cfg), "converted builtin model"
    elif Path(path).is_dir():
        return load_model_config(model_cfg), f"local directory {path}"
    else:
        try:
            return (AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=model_cfg.trust_remote_code),
                    "local hub cache")
        except (OSError, ValueError):
            pass
    if path in KNOWN_MODEL_CONFIGS:
        values = dict(KNOWN_MODEL_CONFIGS[path])
        return AutoConfig.for_model(values.pop("model_type"), **values), "shipped copy of the public config.json"
    if path.startswith(BUILTIN_PREFIX):
        raise ModelError(f"model.path={path}: unknown builtin model; known: {sorted(KNOWN_MODEL_CONFIGS)}")
    return load_model_config(model_cfg), "hub"


def read_model_shape(model_cfg: ModelConfig, target_modules: list[str]) -> ModelShape:
    """Build the model on the meta device (no memory, no weights, a second or two for 70B)."""
    from transformers import AutoModelForCausalLM

    model_config, source = read_model_config(model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=model_cfg.trust_remote_code)
    checkpoint_dtype = _config_dtype(model_config)
    if model_cfg.path.startswith(BUILTIN_PREFIX):
        checkpoint_dtype = "float32"  # prepare_builtin_model writes fp32 safetensors
    return shape_from_model(model, target_modules, model_cfg.path, source, checkpoint_dtype)
