"""The ``compact`` format: each shared LoRA stored once, plus ``sharing.json`` (which layers use
it), with each shared use's gain when the run trained with ``loradrop.shared_scale``; and
:func:`load_compact`, which rebuilds the tied model from it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..importance import sharing_plan
from ..lora import GAINS_FILE
from ..model import parse_layer_key
from .errors import ExportError
from .source import ExportSource

COMPACT_WEIGHTS = "loradrop_compact.safetensors"
SHARING_MAP = "sharing.json"


def check_shares(src: ExportSource) -> None:
    """A compact export needs a LoRA-drop run: a plain LoRA run shares nothing."""
    if src.selection is None:
        raise ExportError("format compact needs a LoRA-drop run (this run trained plain LoRA: nothing is shared); "
                          "use --format peft")


def _module_of(key: str, module_names: list[str]) -> Optional[tuple[int, str, str]]:
    """``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` -> (3, "q_proj", "lora_A")."""
    where = parse_layer_key(key)
    if where is None or where.module not in module_names:
        return None
    ab = where.rest.split(".", 1)[0]
    return (where.layer, where.module, ab) if ab in ("lora_A", "lora_B") else None


def _write_compact(src: ExportSource, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    check_shares(src)
    from ..lora import scaled_b

    weights = load_file(src.adapter_dir / "adapter_model.safetensors")
    plan = sharing_plan(src.selection)
    users: dict[str, list[int]] = {}
    for (layer, module), keep in sorted(plan.items()):
        if not keep:
            users.setdefault(module, []).append(layer)
    scale, gains, unscaled = _shared_gains(src, users)
    compact: dict[str, torch.Tensor] = {f"gain.{layer}.{module}": g for (layer, module), g in gains.items()}
    for key, tensor in weights.items():
        where = _module_of(key, src.selection.module_names)
        if where is None or plan[(where[0], where[1])]:
            compact[key] = tensor  # a kept LoRA, stored as in the peft adapter
            continue
        layer, module, ab = where
        if scale != "none" and ab == "lora_B":  # this use's B is the shared B with its gain baked in
            shared, expected, template = unscaled[module], scaled_b(unscaled[module], gains[(layer, module)]), \
                f"{GAINS_FILE} times gain.{layer}.{module}"
        else:
            template = key.replace(f"layers.{layer}.", f"layers.{users[module][0]}.")
            shared = expected = weights[template]
        if not torch.equal(tensor, expected):
            raise ExportError(f"{key} should equal the shared LoRA in {template} but does not: "
                              "the adapter does not match its selection")
        compact[f"shared.{module}.{ab}.weight"] = shared  # the shared LoRA, once
    save_file(compact, out / COMPACT_WEIGHTS, metadata={"format": "pt"})
    shutil.copy2(src.adapter_dir / "adapter_config.json", out / "adapter_config.json")
    (out / SHARING_MAP).write_text(json.dumps({
        "num_layers": src.selection.num_layers, "module_names": src.selection.module_names,
        "granularity": src.selection.granularity, "kept": src.selection.kept, "shared_users": users,
        "shared_scale": scale,
        "key_template": "shared.{module}.{lora_A|lora_B}.weight stands for the LoRA of every (layer, module) in "
                        "shared_users; with shared_scale scalar or vector, gain.{layer}.{module} is that use's "
                        "gain g (its LoRA is scaling * B diag(g) A; scalar: g * scaling * B A); all other keys "
                        "are as in a PEFT adapter",
    }, indent=2))


def _shared_gains(src: ExportSource, users: dict[str, list[int]]) -> tuple[str, dict, dict]:
    """``(shared_scale, {(layer, module): gain}, {module: unscaled shared B})`` of the run,
    from the adapter's ``lora.GAINS_FILE`` (absent: no gains), checked against the run's
    ``loradrop.shared_scale`` and its shared uses."""
    from safetensors.torch import load_file

    drop = src.config.get("loradrop", {}) if isinstance(src.config.get("loradrop"), dict) else {}
    scale = drop.get("shared_scale", "none")
    path = src.adapter_dir / GAINS_FILE
    if scale == "none" or not users:
        if path.is_file():
            raise ExportError(f"{path}: shared-LoRA gains, but the run's loradrop.shared_scale is {scale!r} and it "
                              f"shares {'no layer' if not users else 'layers'}; the adapter does not match its run")
        return "none", {}, {}
    if not path.is_file():
        raise ExportError(f"{path}: missing; the run trained with loradrop.shared_scale={scale}, and the compact "
                          "export needs its gains (the peft export has them baked in: use --format peft)")
    extras = load_file(path)
    gains, unscaled = {}, {}
    for module, layers in users.items():
        key = f"shared.{module}.lora_B.weight"
        if key not in extras:
            raise ExportError(f"{path}: no {key}; the adapter does not match its selection")
        unscaled[module] = extras.pop(key)
        for layer in layers:
            key = f"gain.{layer}.{module}"
            if key not in extras:
                raise ExportError(f"{path}: no {key}; the adapter does not match its selection")
            gains[(layer, module)] = extras.pop(key)
            r = unscaled[module].shape[1]
            if list(gains[(layer, module)].shape) != ([1] if scale == "scalar" else [r]):
                raise ExportError(f"{path}: {key} has shape {list(gains[(layer, module)].shape)}, not what "
                                  f"shared_scale={scale} at r = {r} gives")
    if extras:
        raise ExportError(f"{path}: {sorted(extras)[:3]} are not shared uses of this run's selection")
    return scale, gains, unscaled


def load_compact(base_model: torch.nn.Module, compact_dir: str | os.PathLike) -> torch.nn.Module:
    """Rebuild the tied LoRA-drop model from a ``compact`` export on a plain base model
    (with each shared use's gain, when the run trained with ``loradrop.shared_scale``)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from ..lora import ADAPTER, GAIN, add_shared_gains, lora_layers, tie_shared_lora

    compact_dir = Path(compact_dir)
    sharing = json.loads((compact_dir / SHARING_MAP).read_text())
    adapter_cfg = json.loads((compact_dir / "adapter_config.json").read_text())
    peft_config = LoraConfig(r=adapter_cfg["r"], lora_alpha=adapter_cfg["lora_alpha"],
                             lora_dropout=adapter_cfg.get("lora_dropout", 0.0),
                             target_modules=adapter_cfg["target_modules"], bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base_model, peft_config)
    plan = {(layer, m): True for layer in range(sharing["num_layers"]) for m in sharing["module_names"]}
    for module, layers in sharing["shared_users"].items():
        for layer in layers:
            plan[(layer, module)] = False
    shared_users = tie_shared_lora(model, plan, train_shared=True)
    add_shared_gains(model, shared_users, sharing.get("shared_scale", "none"))
    weights = load_file(compact_dir / COMPACT_WEIGHTS)
    layers = lora_layers(model, sharing["module_names"])
    with torch.no_grad():
        for key, tensor in weights.items():
            if key.startswith("gain."):
                _, layer, module = key.split(".")
                getattr(layers[(int(layer), module)].lora_A[ADAPTER], GAIN).copy_(tensor)
            elif key.startswith("shared."):
                _, module, ab, _ = key.split(".")
                owner = layers[(sharing["shared_users"][module][0], module)]
                getattr(owner, ab)[ADAPTER].weight.copy_(tensor)
            else:
                layer, module, ab = _module_of(key, sharing["module_names"])
                getattr(layers[(layer, module)], ab)[ADAPTER].weight.copy_(tensor)
    return model
