"""Exporting a finished run or any checkpoint, on CPU, without DeepSpeed or ranks.

Formats:

* ``peft``: the standard adapter; a shared LoRA is written under every layer that uses it,
  so ``PeftModel.from_pretrained`` loads it with no knowledge of LoRA-drop.
* ``compact``: each shared LoRA stored once, plus ``sharing.json`` (which layers use it);
  :func:`load_compact` rebuilds the tied model. Smaller than ``peft`` in proportion to the
  layers shared. With ``loradrop.shared_scale`` it also holds each shared use's gain
  (``gain.{layer}.{module}``) and the unscaled shared B; the ``peft`` and ``merged``
  exports have the gains baked into each use's B.
* ``merged``: LoRA merged into the base weights, loadable by
  ``AutoModelForCausalLM.from_pretrained``: safetensors shards of at most ``max_shard_size``
  (a larger single tensor gets a shard of its own; one ``model.safetensors`` when the model
  fits in one, else shards and ``model.safetensors.index.json``), every tensor in the dtype the base stores it in, with the
  base's ``config.json`` and ``generation_config.json`` and the tokenizer. The weights are
  peft's ``merge_and_unload`` ones. The base is read shard by shard from its safetensors
  files (a base in pickled ``.bin`` files is refused), so peak memory is about one output
  shard plus the adapter plus one fp32 delta of the largest LoRA-targeted weight, whatever the
  model's size. Measured with ``bench/merge_memory.py`` (random fp32 LLaMA, 64 MB shards, peak
  RSS over the RSS after imports): 0.10 GB for a 382 MB model and 0.11-0.12 GB for a 760 MB
  one (its adapter is 10 MB larger), where loading the whole model to merge it took
  0.43-0.47 GB and 0.83-0.85 GB.
* ``pruned``: for a LoRAPrune run (``prune/masks.safetensors`` and ``prune/prune.json`` next to
  the adapter): the ``merged`` export with the pruned attention KV groups (a KV head and its
  query heads) and MLP channels removed, a smaller LLaMA that plain
  ``AutoModelForCausalLM.from_pretrained`` loads (``config.json`` with the kept head counts,
  ``head_dim`` and ``intermediate_size``). transformers' LLaMA has one width for all layers,
  so every layer is written at the widest layer's kept width, a narrower layer padded with
  exactly-zero units that compute what its masks did (:class:`_PruneCut`): with
  LoRAPrune's exempt full-width layers the model is only as small as its widest layer; the
  physical saving is full when no layer is exempt (``prune.exempt_first_fraction=0
  prune.exempt_last=false``). Same streaming and memory as ``merged``.

Every export carries a model card (``README.md``). Exports are written to a temporary
directory and renamed into place, so a failed export leaves nothing half-written, and an
existing non-empty output directory is never overwritten.

The package, a file a part: :mod:`.source` (what an export reads), :mod:`.compact`,
:mod:`.merge` (the shard-by-shard merge), :mod:`.pruned` (LoRAPrune's cut on top of it),
:mod:`.card` (the model card), :mod:`.hub` (``push_to_hub``) and :mod:`.errors`; this file holds the
formats' table (:data:`FORMATS`) and :func:`export`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..atomic import staged_dir
from ..disk_full import DiskFullError, disk_full_reported
from .card import BUILTIN_HUB_IDS, HUB_ID, check_card_metadata, hub_base_model, model_card
from .compact import COMPACT_WEIGHTS, SHARING_MAP, _write_compact, check_shares, load_compact
from .errors import ExportError
from .hub import push_to_hub
from .merge import SAFE_INDEX, SAFE_WEIGHTS, _merge_job, _MergeJob, _shard_size_bytes, _write_merged
from .pruned import PRUNED_SCHEME, _prune_cut, _prune_files, _PruneCut
from .source import ADAPTER_WEIGHTS, ExportSource, check_adapter, open_source, resolve_base_model

__all__ = ["ADAPTER_WEIGHTS", "BUILTIN_HUB_IDS", "COMPACT_WEIGHTS", "FORMATS", "HUB_ID", "PRUNED_SCHEME", "SAFE_INDEX",
           "SAFE_WEIGHTS", "SHARING_MAP", "ExportError", "ExportSource", "Format", "check_adapter",
           "check_card_metadata", "export", "hub_base_model", "load_compact", "model_card", "open_source",
           "push_to_hub", "resolve_base_model"]


@dataclass(frozen=True)
class Format:
    """How one export format is made. Before anything is written: ``check(src)`` on the source
    (before the base model is read); for a format that ``merges``, the base model and the
    adapter against it (:func:`.merge._merge_job`), then ``cut(src, merge_plan)``, the
    per-tensor slices written in place of the whole tensors. Then ``write(src, out)`` writes an
    adapter format; a format that merges is written shard by shard (:func:`.merge._write_merged`)."""

    write: Optional[Callable[[ExportSource, Path], None]] = None
    merges: bool = False
    check: Optional[Callable[[ExportSource], object]] = None
    cut: Optional[Callable[[ExportSource, _MergeJob], _PruneCut]] = None


def _write_peft(src: ExportSource, out: Path) -> None:
    for name in ("adapter_config.json", ADAPTER_WEIGHTS):
        shutil.copy2(src.adapter_dir / name, out / name)


FORMATS: dict[str, Format] = {
    "peft": Format(write=_write_peft),
    "compact": Format(write=_write_compact, check=check_shares),
    "merged": Format(merges=True),
    # A run trained without pruning is refused by the check, before the base is read.
    "pruned": Format(merges=True, check=_prune_files, cut=_prune_cut),
}


def export(source: str | os.PathLike, out: str | os.PathLike, fmt: str = "peft", *, base_model: Optional[str] = None,
           max_shard_size: str = "5GB", base_model_id: Optional[str] = None) -> Path:
    """Write ``fmt`` export of ``source`` to ``out`` (which must not exist or be empty).

    Every input is read and checked before anything is written (the settings, the source's
    files, the adapter, for ``merged`` and ``pruned`` the base's weight files and tokenizer,
    for ``pruned`` the prune masks against the base); on any
    error ``out`` and the directories above it are as they were, and the source is only read."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {list(FORMATS)}")
    spec = FORMATS[fmt]
    _shard_size_bytes(max_shard_size)  # a typo is refused whatever the format
    if base_model_id is not None and not HUB_ID.fullmatch(base_model_id):
        raise ExportError(f"--base-model-id {base_model_id!r}: not a Hub model id; give it as owner/name, "
                          "e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    src = open_source(source)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not empty; choose a new directory (nothing was written)")
    check_adapter(src.adapter_dir)
    if spec.check is not None:
        spec.check(src)
    base_dir = resolve_base_model(src, base_model) if (spec.merges or base_model) else None
    plan = _merge_job(src, base_dir, max_shard_size) if spec.merges else None
    pruned = spec.cut(src, plan) if spec.cut is not None else None
    card = model_card(src, fmt, base_model_id, pruned)

    parent = out.parent if str(out.parent) else Path(".")
    created = [d for d in (parent, *parent.parents) if not d.exists()]  # removed again if the export fails
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(created)
        raise ExportError(f"--out {out}: cannot write there ({e.strerror}); choose a writable directory") from e
    no_space = f"free space or choose another --out; nothing was written to {out}"
    try:
        with disk_full_reported(out, lambda: no_space), staged_dir(out) as tmp:  # an empty ``out`` is replaced whole
            if spec.merges:
                _write_merged(plan, tmp, pruned)
            else:
                spec.write(src, tmp)
            if src.importance_png is not None:
                shutil.copy2(src.importance_png, tmp / "importance.png")
            if src.selection is not None:
                (tmp / "selection.json").write_text(src.selection.to_json())
            (tmp / "README.md").write_text(card)
    except DiskFullError as e:  # the staged copy is removed: ``out`` is as it was
        _remove_empty(created)
        raise ExportError(str(e)) from e
    except BaseException:
        _remove_empty(created)
        raise
    return out


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the directories an export created above ``--out`` (deepest first), if still empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return
