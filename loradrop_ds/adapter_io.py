"""Reading LoRA weights out of a ZeRO-3 model and writing them atomically.

Under ZeRO-3 every rank holds only a shard of each parameter, and ``state_dict()``
returns empty placeholders (the classic 40-byte adapter). We gather the LoRA
parameters on all ranks (a collective), copy them to CPU, and write from rank 0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .atomic import staged_dir
from .engine import gathered


def gather_lora_state(model: nn.Module, copy_here: bool = True) -> dict[str, torch.Tensor]:
    """Full CPU copies of every LoRA tensor, keyed by module path.

    A shared LoRA appears under every layer that uses it (``remove_duplicate=False``),
    each as its own tensor: the standard, materialised PEFT form. With per-use gains
    (``loradrop.shared_scale``) each use's gain is baked into its own B and the gains, with
    the unscaled shared B, are returned under ``lora.EXTRA_PREFIX`` keys instead
    (``lora.bake_shared_gains``); :func:`save_adapter` writes those next to the adapter.
    Call on every rank (the gather is a collective); ranks with ``copy_here=False`` take
    part in it but copy nothing and get ``{}`` (only the writing rank needs the copy).
    """
    from .lora import bake_shared_gains

    named = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if "lora_" in n]
    unique = list({id(p): p for _, p in named}.values())
    with gathered(unique):
        if not copy_here:
            return {}
        state = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}
    return bake_shared_gains(state)


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, is_main: bool,
                 state: Optional[dict[str, torch.Tensor]] = None) -> Optional[Path]:
    """Write ``model`` (a peft model, possibly under ZeRO-3) as a standard PEFT adapter
    (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``PeftModel.from_pretrained`` loads on a plain model. Per-use gains of the shared LoRA
    are baked into the adapter's B weights; the gains and the unscaled shared B go to
    ``lora.GAINS_FILE`` beside it (peft ignores it; the compact export reads it). Call on
    every rank."""
    from peft.utils import get_peft_model_state_dict

    from .lora import EXTRA_PREFIX, GAIN, GAINS_FILE

    state = gather_lora_state(model) if state is None else state
    extras = {k[len(EXTRA_PREFIX):]: v for k, v in state.items() if k.startswith(EXTRA_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(EXTRA_PREFIX)}
    if not is_main:
        return None
    final = Path(out_dir)
    with staged_dir(final) as tmp:
        adapter_state = get_peft_model_state_dict(model, state_dict=state)
        if not adapter_state:
            raise RuntimeError("no LoRA weights found to save")
        leaked = [k for k in adapter_state if GAIN in k]
        if leaked:
            raise RuntimeError(f"shared-LoRA gains {leaked[:3]} would be written into the PEFT adapter; pass the "
                               "state gather_lora_state returns")
        model.peft_config["default"].save_pretrained(tmp)
        from safetensors.torch import save_file

        save_file(adapter_state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        if extras:
            save_file(extras, tmp / GAINS_FILE, metadata={"format": "pt"})
    return final
