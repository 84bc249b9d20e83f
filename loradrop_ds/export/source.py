"""What an export reads, found and checked before anything is written: the run or checkpoint
(:func:`open_source`), its adapter (:func:`check_adapter`) and the base model it trained on
(:func:`resolve_base_model`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import run_checkpoint as ckpt
from ..importance import Selection
from ..lora import GAINS_FILE
from .errors import ExportError, _json_object, _parsed, _read_safetensors_header, _yaml_mapping

log = logging.getLogger(__package__)  # the export's one logger, loradrop_ds.export
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class ExportSource:
    """What an export reads: an adapter and what is known about the run that made it."""

    path: Path
    kind: str  # "run" or "checkpoint"
    adapter_dir: Path
    config: dict
    selection: Optional[Selection]
    results: dict
    base_model: dict  # {"path", "config_sha256"}
    importance_png: Optional[Path]


def check_adapter(adapter_dir: Path) -> None:
    """Read the adapter before anything is written: ``adapter_config.json`` must be a LoRA
    config and ``adapter_model.safetensors`` a whole safetensors file (its header's sizes and
    offsets add up to the file, every tensor reads back and is finite). A corrupt adapter is
    named, never copied through."""
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ExportError(f"{config_file}: missing; the adapter is incomplete")
    config = _parsed(config_file, _json_object)
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if str(config.get("peft_type", "LORA")).upper() != "LORA" or missing:
        raise ExportError(f"{config_file}: not a LoRA adapter config (peft_type {config.get('peft_type')!r}"
                          + (f", no {', '.join(missing)}" if missing else "") + ")")
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ExportError(f"{weights}: missing; the adapter is incomplete")
    _check_safetensors(weights)
    if (adapter_dir / GAINS_FILE).is_file():  # the shared LoRA's per-use gains (loradrop.shared_scale)
        _check_safetensors(adapter_dir / GAINS_FILE)


def _check_safetensors(weights: Path) -> None:
    """A whole safetensors file whose every tensor reads back finite."""
    header = _read_safetensors_header(weights)
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for name in header:
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise ExportError(f"{weights}: tensor {name} holds non-finite values (inf or nan); the "
                                      "adapter is corrupt or the run diverged; export an earlier checkpoint")
    except ExportError:
        raise
    except Exception as e:  # SafetensorError and friends: the file is not what its header says
        raise ExportError(f"{weights}: corrupt, it cannot be read ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None


def open_source(path: str | os.PathLike) -> ExportSource:
    """A finished run directory, a checkpoint directory, or a run that has only checkpoints
    (its newest complete one is used)."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: no such directory (give a run's output_dir or one of its checkpoints)")
    if (path / ckpt.MARKER).exists() or (path / "state.json").exists():
        problem = ckpt.verify_checkpoint(path)
        if problem:
            raise ExportError(f"{path}: not a complete checkpoint: {problem}")
        state = _parsed(path / "state.json", lambda f: ckpt.read_state(f.parent))
        selection = _parsed(path / "state.json", lambda f: Selection.from_dict(state.selection)) \
            if state.selection else None
        return ExportSource(path, "checkpoint", path / "adapter", state.config, selection, state.results,
                            state.base_model, None)
    if (path / "adapter" / "adapter_config.json").is_file() and (path / "config.yaml").is_file():
        config = _parsed(path / "config.yaml", _yaml_mapping)
        model_path = config.get("model", {}).get("path") if isinstance(config.get("model"), dict) else None
        if not isinstance(model_path, str):
            raise ExportError(f"{path / 'config.yaml'}: no model.path setting; this is not the config.yaml a "
                              "loradrop_ds run writes")
        sel = path / "selection.json"
        summary = path / "summary.json"
        results = _parsed(summary, lambda f: _json_object(f)) if summary.is_file() else {}
        newest = _parsed(path / ckpt.CHECKPOINTS, lambda f: ckpt.list_checkpoints(path, warn=False))
        base = newest[0][1].base_model if newest else {"path": model_path, "config_sha256": None}
        png = path / "importance.png"
        return ExportSource(path, "run", path / "adapter", config,
                            _parsed(sel, lambda f: Selection.from_json(f.read_text())) if sel.is_file() else None,
                            results, base, png if png.is_file() else None)
    found = _parsed(path / ckpt.CHECKPOINTS, lambda f: ckpt.list_checkpoints(path, warn=True))
    if found:
        log.warning("%s has no final adapter (the run did not finish); exporting its newest checkpoint %s",
                    path, found[0][0])
        return open_source(found[0][0])
    raise ExportError(f"{path} is neither a loradrop_ds run (adapter/ and config.yaml) nor a checkpoint "
                      f"({ckpt.MARKER}); point at a run's output_dir or output_dir/checkpoints/<name>")


def resolve_base_model(src: ExportSource, base_model: Optional[str]) -> str:
    """The base model directory for merging/loading, checked against the one trained on."""
    from ..model import BUILTIN_PREFIX, prepare_builtin_model, resolve_model_path

    if base_model is not None and not base_model.startswith(BUILTIN_PREFIX):
        if not Path(base_model).is_dir():
            raise ExportError(f"--base-model {base_model}: no such directory; give the local directory of the base "
                              "model (a Hub copy: hf download ID --local-dir DIR), or leave --base-model out to use "
                              "the one the run trained on")
        if not (Path(base_model) / "config.json").is_file():
            raise ExportError(f"--base-model {base_model}: no config.json there; it is not a model directory")
    path = base_model or src.base_model.get("path") or src.config["model"]["path"]
    if path.startswith(BUILTIN_PREFIX):
        prepare_builtin_model(path[len(BUILTIN_PREFIX):])
    resolved = resolve_model_path(path)
    want = src.base_model.get("config_sha256")
    if want is not None and Path(resolved).is_dir():
        got = ckpt.base_model_identity(path, resolved)["config_sha256"]
        if got != want:
            raise ExportError(f"{path} is not the base model this adapter was trained on "
                              f"({src.base_model.get('path')}): its config.json differs")
    return resolved
