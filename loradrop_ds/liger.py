"""``model.liger``: Liger's fused Triton kernels on a LLaMA model (CUDA only; the optional
``liger`` extra, liger-kernel >= 0.8, read in 0.8.5).

- :func:`check_liger` refuses, on every rank before any weights are read, what the kernels
  cannot run: a non-CUDA device, a model that is not LLaMA-architecture, an activation or an
  MLP bias Liger's SwiGLU kernel does not implement, liger-kernel missing.
- :func:`apply_liger` puts them on a built model. RMSNorm, RoPE and SwiGLU come from liger's
  ``apply_liger_kernel_to_llama(..., model=model)`` (``transformers/monkey_patch.py``): it
  binds Liger's forwards to this model's norm and MLP modules (they keep their own
  parameters, named as before, so the weights were loaded and partitioned by ZeRO-3 as
  usual), and it replaces ``apply_rotary_pos_emb``, ``LlamaRMSNorm`` and ``LlamaMLP`` in
  transformers' ``modeling_llama`` for the whole process (later builds get them at
  construction: LigerRMSNorm's parameter is also ``weight``). Bound per instance, they
  survive peft's wrap and ``unload``, so the main stage built on the sampling stage's base
  (lora.strip_lora) keeps them; a base read again is patched again by ``load_model``.
- The loss: not liger's ``lce_forward`` but :mod:`loradrop_ds.fused_loss` with Liger's
  ``liger_fused_linear_cross_entropy`` as its kernel, so that the LM head's weight is gathered
  for the loss alone under ZeRO-3 (why: that module's docstring), and so that the forward
  around the kernel is the one the CPU tests run with the kernel's plain-torch twin.
  Liger's kernel computes the hidden states' gradient in its forward (reduction ``mean``:
  ``LigerFusedLinearCrossEntropyFunction`` saves ``grad_input``, not the weight), so the
  backward needs no weight. Evaluation (no labels) takes the class's forward: logits as usual.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import ConfigError, ModelConfig
from .fused_loss import attach_fused_loss

# What apply_liger_kernel_to_llama and its SwiGLU kernel implement (liger-kernel 0.8.5):
# LLaMA's own model type (LLaMA 2/3, SmolLM2, ...), SiLU-gated MLPs.
LIGER_MODEL_TYPES = ("llama",)
SWIGLU_ACTIVATIONS = ("silu", "swish")
FIX = "set model.liger=false"


def _liger_import_problem() -> str | None:
    try:
        import liger_kernel.transformers  # noqa: F401  (imports triton)
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception as e:  # ImportError, or triton failing to initialise
        return f"{type(e).__name__}: {' '.join(str(e).split())}"  # one line, whatever triton says
    return None


def check_liger(cfg: ModelConfig, model_config: Any, device_type: str) -> None:
    """Refuse ``model.liger=true`` where Liger cannot run (one line naming the fix).
    Read from the config alone, before any weights."""
    if not cfg.liger:
        return
    if device_type != "cuda":
        raise ConfigError(f"model.liger=true needs a CUDA device (Liger's kernels are Triton GPU kernels), and this "
                          f"rank runs on {device_type}; {FIX}")
    model_type = getattr(model_config, "model_type", None)
    if model_type not in LIGER_MODEL_TYPES:
        raise ConfigError(f"model.liger=true supports LLaMA-architecture models (model_type llama: LLaMA 2/3, "
                          f"SmolLM2), and model.path={cfg.path} is {model_type}; {FIX}")
    act = getattr(model_config, "hidden_act", None)
    if act not in SWIGLU_ACTIVATIONS:
        raise ConfigError(f"model.liger=true: Liger's SwiGLU kernel needs hidden_act silu, and model.path={cfg.path} "
                          f"has {act}; {FIX}")
    if getattr(model_config, "mlp_bias", False):
        raise ConfigError(f"model.liger=true: Liger's SwiGLU MLP has no biases, and model.path={cfg.path} has "
                          f"mlp_bias=true; {FIX}")
    problem = _liger_import_problem()
    if problem is not None:
        raise ConfigError(f"model.liger=true needs the liger-kernel package ({problem}): pip install "
                          f"\"loradrop_ds[liger]\" (or pip install -e \".[liger]\" in a checkout), or {FIX}")


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               ignore_index: int) -> torch.Tensor:
    """Liger's fused linear cross-entropy, mean over the valid tokens (fused_loss's kernel)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index, reduction="mean")


def apply_liger(model: torch.nn.Module) -> torch.nn.Module:
    """Liger's RMSNorm, RoPE and SwiGLU on ``model`` (a built LlamaForCausalLM, before peft),
    and the fused linear cross-entropy as its training loss."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)
    return attach_fused_loss(model, liger_linear_cross_entropy)
