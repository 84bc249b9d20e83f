"""The model's dimensions, one record (:class:`ModelDims`) for everything that sizes or indexes
by them: the preflight checks, the LoRA counts, DeepSpeed's "auto" buffer sizes
(``engine.SizeHints``), the memory planner, LoRAPrune's masks and the pruned export. Read from
the config alone on the meta device (no weights), and where that config comes from (a local
copy, the hub cache, or the shipped public values of the models the recipes name).

A training run reads config.json and builds the weightless model once (``preflight``) and hands
the record on; ``launch/plan.py`` reads it through :func:`read_model_dims`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .config import ModelConfig
from .model import BUILTIN_PREFIX, ModelError, builtin_model_dir, decoder_layers, load_model_config

# Public config.json values (huggingface.co/<id>/blob/main/config.json) of the models the
# recipes and the peft anchor name, used when the id is not in the local hub cache: the hub
# is often unreachable (and meta-llama repos are gated), and these values never change.
# Cross-checked: the parameter counts they give on the meta device are the published ones
# (Llama-2-7B 6,738,415,616; Llama-2-13B 13,015,864,320; Llama-2-70B 68,976,648,192;
# Llama-3-70B 70,553,706,496).
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


def attention_layout(hidden_size: int, num_heads: int, num_kv_heads: Optional[int], head_dim: Optional[int]
                     ) -> tuple[int, int]:
    """``(num_kv_heads, head_dim)`` as transformers' LLaMA attention builds them when a config
    leaves them out: as many KV heads as query heads (no grouped-query attention), and
    ``hidden_size // num_heads`` per head. The one place these defaults are derived (the
    record below, and the pruned export from a base's config.json)."""
    return int(num_kv_heads or num_heads), int(head_dim or hidden_size // num_heads)


@dataclass(frozen=True)
class ModelDims:
    """A causal LM's dimensions, read from a weightless (meta-device) copy and its config."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    # LoRA target module -> (in_features, out_features); the same in every decoder layer
    target_shapes: dict[str, tuple[int, int]]
    largest_weight_numel: int  # the largest linear weight of a decoder layer (sizes ZeRO-3 buffers)
    param_numels: tuple[int, ...]  # every parameter once: a tied embedding / lm_head counts once
    layer_param_numels: tuple[int, ...]  # the parameters of the largest decoder layer
    name: str = ""
    source: str = ""  # where the config came from
    checkpoint_dtype: Optional[str] = None  # dtype of the stored weights, when the config says

    @property
    def total_params(self) -> int:
        return sum(self.param_numels)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``target_shapes`` under ModuleInfo's name for it (the record this one replaced), which
        tests/test_lora.py and tests/test_recipes.py read."""
        return self.target_shapes

    @classmethod
    def from_model(cls, model: torch.nn.Module, target_modules: list[str], name: str = "", source: str = "",
                   checkpoint_dtype: Optional[str] = None) -> ModelDims:
        """Read the dimensions off a (meta-device) causal LM and its ``model.config``, checking
        that every target module exists as an ``nn.Linear`` of one shape in every decoder layer.
        ``named_parameters`` yields a tied embedding / lm_head pair once (torch de-duplicates
        shared parameters), as ZeRO-3 partitions and the checkpoint stores it once."""
        layers = decoder_layers(model)
        shapes: dict[str, tuple[int, int]] = {}
        largest = max((m.in_features * m.out_features for m in layers.modules() if isinstance(m, torch.nn.Linear)),
                      default=0)
        for i, layer in enumerate(layers):
            found = {}
            for module_name, module in layer.named_modules():
                short = module_name.rsplit(".", 1)[-1]
                if short in target_modules and hasattr(module, "in_features"):
                    found[short] = (module.in_features, module.out_features)
            missing = [m for m in target_modules if m not in found]
            if missing:
                present = sorted({n.rsplit(".", 1)[-1] for n, m in layer.named_modules()
                                  if isinstance(m, torch.nn.Linear)})
                raise ModelError(
                    f"lora.target_modules {missing} not found in decoder layer {i}; "
                    f"linear modules there are {present}"
                )
            for m, shape in found.items():
                if shapes.setdefault(m, shape) != shape:
                    raise ModelError(f"{m} has shape {shape} in layer {i} but {shapes[m]} in layer 0: "
                                     "cannot share one LoRA")
        config = model.config
        hidden = int(getattr(config, "hidden_size", None) or max(i for i, _ in shapes.values()))
        heads = int(config.num_attention_heads)
        kv_heads, head_dim = attention_layout(hidden, heads, getattr(config, "num_key_value_heads", None),
                                              getattr(config, "head_dim", None))
        largest_layer = max(layers, key=lambda layer: sum(p.numel() for p in layer.parameters()))
        out_emb = model.get_output_embeddings()
        in_emb = model.get_input_embeddings()
        tied = out_emb is not None and out_emb.weight is in_emb.weight
        vocab = int(out_emb.weight.shape[0]) if out_emb is not None else int(config.vocab_size)
        return cls(
            num_layers=len(layers), hidden_size=hidden,
            intermediate_size=int(getattr(config, "intermediate_size", 4 * hidden)),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, tied_embeddings=tied,
            target_shapes=shapes, largest_weight_numel=largest,
            param_numels=tuple(p.numel() for p in model.parameters()),
            layer_param_numels=tuple(p.numel() for p in largest_layer.parameters()),
            name=name, source=source, checkpoint_dtype=checkpoint_dtype,
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


def dims_from_config(model_config: Any, target_modules: list[str], model_cfg: Optional[ModelConfig] = None,
                     source: str = "") -> ModelDims:
    """Build the model on the meta device (no memory, no weights, a second or two for 70B) and
    read its dimensions. ``model_cfg``: the recipe's model section the config was read for (its
    path names the model; trust_remote_code; a builtin model is stored in fp32)."""
    from transformers import AutoModelForCausalLM

    trust_remote_code = model_cfg.trust_remote_code if model_cfg is not None else False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    path = model_cfg.path if model_cfg is not None else ""
    checkpoint_dtype = _config_dtype(model_config)
    if path.startswith(BUILTIN_PREFIX):
        checkpoint_dtype = "float32"  # prepare_builtin_model writes fp32 safetensors
    return ModelDims.from_model(model, target_modules, path, source, checkpoint_dtype)


def read_model_dims(model_cfg: ModelConfig, target_modules: list[str]) -> ModelDims:
    """The dimensions of ``model.path``: its config read once (:func:`read_model_config`), the
    weightless model built once."""
    model_config, source = read_model_config(model_cfg)
    return dims_from_config(model_config, target_modules, model_cfg, source)
