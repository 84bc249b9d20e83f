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
  exactly-zero units that compute what its masks did (:class:`_PrunePlan`): with
  LoRAPrune's exempt full-width layers the model is only as small as its widest layer; the
  physical saving is full when no layer is exempt (``prune.exempt_first_fraction=0
  prune.exempt_last=false``). Same streaming and memory as ``merged``.

Every export carries a model card (``README.md``). Exports are written to a temporary
directory and renamed into place, so a failed export leaves nothing half-written, and an
existing non-empty output directory is never overwritten.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import yaml

from . import run_checkpoint as ckpt
from .importance import Selection, sharing_plan
from .lora import GAINS_FILE
from .sizes import parse_size

log = logging.getLogger(__name__)
FORMATS = ("peft", "compact", "merged", "pruned")
COMPACT_WEIGHTS = "loradrop_compact.safetensors"
SHARING_MAP = "sharing.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The Hub repository each builtin model was converted from: the model card's ``base_model``.
BUILTIN_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name, as the Hub's model card metadata wants base_model
# Bytes per element of safetensors' dtypes (others, such as packed sub-byte ones, get the offsets checked only).
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
# Settings of a peft LoRA whose merge is more than ``W += scaling * B @ A`` (or that carry weights besides A and B).
_UNMERGEABLE_SETTINGS = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices", "target_parameters",
                         "layer_replication")


class ExportError(ValueError):
    """An export that cannot be made as asked; the message says why and how to fix it."""


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


def _parsed(path: Path, read):
    """``read(path)``, with a file that does not parse reported as an ExportError naming it."""
    try:
        return read(path)
    except ExportError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError) as e:
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors; a JSON of the wrong
        # shape gives TypeError/KeyError/AttributeError in the dataclass it is read into.
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        mark = getattr(e, "problem_mark", None)
        if isinstance(e, yaml.MarkedYAMLError) and mark is not None:
            what = f"{e.problem} at line {mark.line + 1}, column {mark.column + 1}"
        if isinstance(e, UnicodeDecodeError):
            line = e.object[:e.start].count(b"\n") + 1
            what = f"a byte that is not UTF-8 at line {line}"
        raise ExportError(f"{path}: does not parse ({type(e).__name__}: {what}); the file is corrupt or was "
                          "edited by hand") from None


def _yaml_mapping(path: Path) -> dict:
    data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    if not isinstance(data, dict):
        raise ExportError(f"{path}: a YAML mapping of settings was expected, found {type(data).__name__}")
    return data


def _json_object(path: Path) -> dict:
    data = json.loads(path.read_bytes().decode("utf-8"))
    if not isinstance(data, dict):
        raise ExportError(f"{path}: a JSON object was expected, found {type(data).__name__}")
    return data


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
    from .model import BUILTIN_PREFIX, prepare_builtin_model, resolve_model_path

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


# ------------------------------------------------------------------------- formats


def _write_peft(src: ExportSource, out: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(src.adapter_dir / name, out / name)


def _module_of(key: str, module_names: list[str]) -> Optional[tuple[int, str, str]]:
    """``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` -> (3, "q_proj", "lora_A")."""
    parts = key.split(".")
    if "layers" not in parts:
        return None
    i = parts.index("layers")
    layer = int(parts[i + 1])
    ab = next(p for p in parts if p in ("lora_A", "lora_B"))
    module = parts[parts.index(ab) - 1]
    return (layer, module, ab) if module in module_names else None


def _write_compact(src: ExportSource, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    if src.selection is None:
        raise ExportError("format compact needs a LoRA-drop run (this run trained plain LoRA: nothing is shared); "
                          "use --format peft")
    from .lora import scaled_b

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

    from .lora import ADAPTER, GAIN, add_shared_gains, lora_layers, tie_shared_lora

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


# -------------------------------------------------------------- merged, shard by shard


@dataclass
class _BaseTensor:
    """One tensor of the base checkpoint, as its file's header describes it (nothing read)."""

    file: Path
    shape: list[int]
    nbytes: int


@dataclass
class _LoraFactors:
    """The LoRA of one base weight, read from the peft adapter."""

    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scaling: float
    transpose: bool  # the base layer is transformers' Conv1D, whose weight is stored [in, out] (peft's fan_in_fan_out)


def _shard_size_bytes(size: str | int) -> int:
    """``--max-shard-size`` in bytes: an int, or a size in the project's one grammar (loradrop_ds.sizes)."""
    try:
        value = size if isinstance(size, int) else parse_size(str(size))
    except ValueError:
        value = 0
    if value <= 0:
        raise ExportError(f"--max-shard-size {size}: give a positive size such as 5GB or 500MB")
    return value


def _local_model_dir(base_dir: str) -> Path:
    """The base model's directory; a Hub id is fetched (safetensors, JSON and code files only)."""
    if Path(base_dir).is_dir():
        return Path(base_dir)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base_dir, allow_patterns=["*.json", "*.safetensors", "*.py"]))
    except Exception as e:  # network, auth, missing repository: many types
        raise ExportError(f"base model {base_dir}: not a local directory, and fetching it from the Hub failed "
                          f"({type(e).__name__}); pass its local directory with --base-model") from None


def _base_weight_files(model_dir: Path) -> list[Path]:
    """The base's safetensors files: ``model.safetensors``, or the shards its index lists.
    Pickled weights (``*.bin``) are refused, never loaded: unpickling can run code."""
    if (model_dir / SAFE_WEIGHTS).is_file():
        return [model_dir / SAFE_WEIGHTS]
    if (model_dir / SAFE_INDEX).is_file():
        weight_map = _parsed(model_dir / SAFE_INDEX, lambda f: dict(_json_object(f)["weight_map"]))
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ExportError(f"{model_dir / SAFE_INDEX} lists {missing[0]}, which is not in {model_dir}; "
                              "the base model's download is incomplete")
        return files
    pickles = sorted(p.name for p in model_dir.glob("*.bin"))
    found = f"it holds PyTorch pickle weights ({', '.join(pickles[:3])})" if pickles else "it holds no model weights"
    raise ExportError(f"base model {model_dir}: no {SAFE_WEIGHTS} or {SAFE_INDEX}, {found}; the merged export reads "
                      "safetensors only (loading a pickle can run code). Convert the base once, e.g. "
                      "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) (transformers writes "
                      "safetensors), and pass --base-model NEW_DIR")


def _read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON): names,
    dtypes, shapes and byte ranges, without reading any tensor."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or length > size - 8:
            raise ExportError(f"{path}: truncated or not a safetensors file ({size} bytes, header says {length} "
                              "bytes of metadata)")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):
            header = None
    if not isinstance(header, dict):
        raise ExportError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_bytes, end_max = size - 8 - length, 0
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            per = _DTYPE_BYTES.get(info["dtype"], 0) if isinstance(info["dtype"], str) else None
            want = math.prod(info["shape"]) * per if per else end - start  # per 0: a dtype not in the table
            ok = (per is not None and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end
                  and end - start == want)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ExportError(f"{path}: corrupt safetensors header: tensor {name} has inconsistent dtype, shape "
                              "or offsets")
        if end > data_bytes:
            raise ExportError(f"{path}: truncated: tensor {name} ends at byte {end} of the data, the file holds "
                              f"{data_bytes} ({size} bytes in all); download or copy it again")
        end_max = max(end_max, end)
    if end_max != data_bytes:
        raise ExportError(f"{path}: {data_bytes - end_max} bytes more than its tensors; the file is corrupt")
    return header


def _base_tensors(files: list[Path]) -> dict[str, _BaseTensor]:
    """Every tensor of the base, in file order and, within a file, in the order it is stored
    (so reading them is one sequential pass)."""
    found: dict[str, _BaseTensor] = {}
    for path in files:
        header = _read_safetensors_header(path)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if name in found:
                raise ExportError(f"base model: tensor {name} is in both {found[name].file.name} and {path.name}")
            start, end = info["data_offsets"]
            found[name] = _BaseTensor(path, info["shape"], end - start)
    index = files[0].parent / SAFE_INDEX
    if files[0].name != SAFE_WEIGHTS and index.is_file():
        for name, file in _parsed(index, lambda f: dict(_json_object(f)["weight_map"])).items():
            if name not in found or found[name].file.name != file:
                raise ExportError(f"{index} maps {name} to {file}, which does not hold it; the base model is inconsistent")
    return found


def _lora_factors(adapter_dir: Path, model_dir: Path, tensors: dict[str, _BaseTensor],
                 trust_remote_code: bool) -> dict[str, _LoraFactors]:
    """``{base weight name: its LoRA}`` for every weight the adapter targets, checked both ways
    against the base: every adapter key must land on a base weight, and every weight its
    ``target_modules`` select must be in the base and have a LoRA in the adapter.

    Which modules are targeted, and whether ``B @ A`` is transposed, are decided as peft
    decides them when it loads the adapter: on a weightless (meta-device) copy of the model,
    with peft's own target matching; peft transposes for transformers' ``Conv1D`` layers and
    never for ``nn.Linear``, whatever ``fan_in_fan_out`` says."""
    from peft import LoraConfig, PeftType
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = _parsed(adapter_dir / "adapter_config.json", lambda f: LoraConfig.from_pretrained(str(adapter_dir)))
    variants = [f.name for f in fields(config) if f.metadata.get("is_lora_variant") and getattr(config, f.name)]
    unmergeable = variants + [name for name in _UNMERGEABLE_SETTINGS if getattr(config, name, None)]
    if config.peft_type != PeftType.LORA or unmergeable:
        raise ExportError(f"{adapter_dir}: the merged export merges plain LoRA only, and this adapter is "
                          f"{config.peft_type} with {unmergeable}; export it with --format peft")
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"base model {model_dir}: no config.json; it is not a model directory")
    model_config = _parsed(model_dir / "config.json",
                           lambda f: AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code))
    if getattr(model_config, "quantization_config", None):
        raise ExportError(f"base model {model_dir} is quantized; merging needs its unquantized weights")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    targets: dict[str, bool] = {}  # module name -> transpose
    for name, module in skeleton.named_modules():
        if not name or not check_target_module_exists(config, name):
            continue
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            raise ExportError(f"the adapter targets {name}, a {type(module).__name__}; the merged export merges LoRA "
                              "on Linear layers only; export with --format peft")
        targets[name] = isinstance(module, Conv1D)
    if not targets:  # peft refuses such an adapter too ("Target modules ... not found in the base model")
        raise ExportError(f"the adapter's target_modules {config.target_modules} select no layer of the base model "
                          f"{model_dir}: this adapter was not trained on this base")

    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(adapter_dir / ADAPTER_WEIGHTS).items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None:
            raise ExportError(f"adapter key {key} is not a LoRA A or B weight; the merged export merges plain LoRA "
                              "only; export with --format peft")
        module, half = m.groups()
        if f"{module}.weight" not in tensors:
            raise ExportError(f"adapter key {key} targets {module}.weight, which is not in the base model "
                              f"{model_dir}: this adapter was not trained on this base")
        if module not in targets:
            raise ExportError(f"adapter key {key}: {module} is not selected by the adapter's target_modules "
                              f"{config.target_modules}; adapter_config.json and the weights disagree")
        halves.setdefault(module, {})[half] = tensor

    rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
    factors: dict[str, _LoraFactors] = {}
    for module, transpose in targets.items():
        weight = f"{module}.weight"
        if weight not in tensors:
            raise ExportError(f"the adapter targets {weight} (target_modules {config.target_modules}), but the base "
                              f"model {model_dir} does not hold it")
        have = halves.get(module, {})
        for half in ("lora_A", "lora_B"):
            if half not in have:
                raise ExportError(f"the adapter has no base_model.model.{module}.{half}.weight, but its target_modules "
                                  f"{config.target_modules} select {module}; the adapter is incomplete")
        # Scaling as peft's LoraModel._create_and_replace and LoraLayer.update_layer compute it.
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.r)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.lora_alpha)
        a, b = have["lora_A"], have["lora_B"]
        delta_shape = [a.shape[1], b.shape[0]] if transpose else [b.shape[0], a.shape[1]]
        if a.shape[0] != r or b.shape[1] != r or delta_shape != tensors[weight].shape:
            raise ExportError(f"base_model.model.{module}.lora_A/lora_B.weight have shapes {list(a.shape)} and "
                              f"{list(b.shape)} (r = {r}), which do not fit {weight} of shape {tensors[weight].shape}")
        factors[weight] = _LoraFactors(a, b, alpha / math.sqrt(r) if config.use_rslora else alpha / r, transpose)
    return factors


def _merge_lora(weight: torch.Tensor, lora: _LoraFactors) -> torch.Tensor:
    """``weight += scaling * B @ A`` in place, computed as peft's ``merge_and_unload`` computes it
    (``LoraLayer.get_delta_weight``, then ``base_layer.weight.data += delta``): A and B in fp32
    (peft loads an adapter in fp32 on any base dtype, ``autocast_adapter_dtype``), ``B @ A``
    transposed for Conv1D, then times scaling; the in-place add computes in fp32 and rounds
    a half-precision weight once, so the result has the base weight's dtype."""
    delta = lora.b.float() @ lora.a.float()
    if lora.transpose:
        delta = delta.T
    weight += delta.mul_(lora.scaling)  # in place: the same products as peft's ``* scaling``, one fp32 temporary less
    return weight


def _plan_output_shards(tensors: dict[str, _BaseTensor], max_bytes: int) -> list[list[str]]:
    """Tensor names per output shard, in order: a shard is closed when the next tensor would
    take it over ``max_bytes``; a tensor larger than that gets a shard of its own (as
    transformers' ``save_pretrained`` shards)."""
    shards: list[list[str]] = []
    size = 0
    for name, info in tensors.items():
        if not shards or size + info.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += info.nbytes
    return shards


def _stream_base_tensors(tensors: dict[str, _BaseTensor]):
    """``(name, tensor)`` in the order of ``tensors``, one base file open at a time.

    safetensors' ``pread`` backend reads each tensor into memory of its own, so what is held
    is what the output shard holds. The default memory map keeps every page read resident
    (counted in RSS) until the file is closed: a whole base file, however large it is (a
    single-file base: the whole model; measured: 332 MB held for a 320 MB file). A
    safetensors without the ``pread`` backend (it came with 0.8) memory-maps: the merge then
    holds up to one base file."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, info in tensors.items():
        by_file.setdefault(info.file, []).append(name)
    for path, names in by_file.items():
        try:
            reader = safe_open(str(path), framework="pt", device="cpu", backend="pread")
        except (TypeError, ValueError):  # no ``backend`` argument, or no "pread" among its values
            reader = safe_open(str(path), framework="pt", device="cpu")
        with reader:
            for name in names:
                yield name, reader.get_tensor(name)


@dataclass
class _MergePlan:
    """Everything the merged export needs, read and checked before anything is written."""

    model_dir: Path
    trust: bool
    tensors: dict[str, _BaseTensor]
    factors: dict[str, _LoraFactors]
    shards: list[list[str]]
    max_bytes: int
    tokenizer: object


def _plan_merged(src: ExportSource, base_dir: str, max_shard_size: str | int) -> _MergePlan:
    """Read and check the base (its safetensors headers against the files' sizes, so a missing
    or truncated weight file is refused here), the adapter against it, and the tokenizer."""
    from transformers import AutoTokenizer

    from .model import resolve_model_path

    trust = bool(src.config.get("model", {}).get("trust_remote_code", False))
    max_bytes = _shard_size_bytes(max_shard_size)
    model_dir = _local_model_dir(base_dir)
    tensors = _base_tensors(_base_weight_files(model_dir))
    factors = _lora_factors(src.adapter_dir, model_dir, tensors, trust)
    tok_path = src.config.get("model", {}).get("tokenizer") or base_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tok_path), trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise ExportError(f"tokenizer {tok_path}: cannot be loaded ({type(e).__name__}); the merged export "
                          "writes it next to the weights") from None
    return _MergePlan(model_dir, trust, tensors, factors, _plan_output_shards(tensors, max_bytes), max_bytes,
                      tokenizer)


def _write_merged(plan: _MergePlan, out: Path, pruned: Optional[_PrunePlan] = None) -> None:
    """Merge shard by shard: the base's tensors are read one at a time, each LoRA-targeted
    weight gets its delta, and every output shard is written as soon as it is full, so
    memory holds one output shard (``max_shard_size``), the adapter and one fp32 delta,
    whatever the model's size. The output is sharded by ``max_shard_size`` like
    ``save_pretrained`` (one file ``model.safetensors``, or shards plus an index), each
    tensor in the dtype the base stores it in.

    With ``pruned`` (the ``pruned`` format), each merged tensor is then cut as the prune plan
    says (:class:`_PrunePlan`), the shards are planned on the cut sizes, and ``config.json``
    is the plan's (the kept widths, ``head_dim`` written explicitly)."""
    from safetensors.torch import save_file

    model_dir, tensors, factors, shards, max_bytes = plan.model_dir, plan.tensors, plan.factors, plan.shards, \
        plan.max_bytes
    if pruned is not None:
        shards = _plan_output_shards(pruned.shapes(tensors), max_bytes)
    for name in ("config.json", "generation_config.json"):
        if (model_dir / name).is_file() and not (pruned is not None and name == "config.json"):
            shutil.copy2(model_dir / name, out / name)
    if pruned is not None:
        (out / "config.json").write_text(json.dumps(pruned.config, indent=2, sort_keys=True) + "\n")
    elif plan.trust:  # the model's own code, which config.json's auto_map names
        for code in model_dir.glob("*.py"):
            shutil.copy2(code, out / code.name)
    plan.tokenizer.save_pretrained(out)

    log.info("merging LoRA into %d of %d base tensors, %d output shard(s) of up to %s bytes",
             len(factors), len(tensors), len(shards), f"{max_bytes:,}")
    if pruned is not None:
        log.info("pruning: KV groups kept per layer %s, MLP channels kept per layer %s; every layer is written with "
                 "%d KV groups (%d query heads) and %d channels: %s. Parameters: %s physical, %s non-zero, %s "
                 "unpruned", pruned.kept_groups, pruned.kept_channels, pruned.width_groups,
                 pruned.width_groups * pruned.n_rep, pruned.width_channels, PRUNED_SCHEME,
                 f"{pruned.physical_params:,}", f"{pruned.nonzero_params:,}", f"{pruned.unpruned_params:,}")

    names = [SAFE_WEIGHTS] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                     for i in range(1, len(shards) + 1)]
    stream = _stream_base_tensors(tensors)
    weight_map: dict[str, str] = {}
    total_params = total_size = 0
    for filename, shard in zip(names, shards, strict=True):
        merged: dict[str, torch.Tensor] = {}  # drops the previous shard before this one is read
        for name in shard:
            streamed, tensor = next(stream)
            assert streamed == name  # the plan and the stream walk ``tensors`` in the same order
            tensor = _merge_lora(tensor, factors[name]) if name in factors else tensor
            if pruned is not None and name in pruned.slices:
                tensor = pruned.slices[name].apply(tensor)  # after the merge: LoRA's delta is on the full shape
            merged[name] = tensor
            weight_map[name] = filename
            total_params += tensor.numel()
            total_size += tensor.numel() * tensor.element_size()
        save_file(merged, out / filename, metadata={"format": "pt"})
    if len(shards) > 1:
        (out / SAFE_INDEX).write_text(json.dumps({
            "metadata": {"total_parameters": total_params, "total_size": total_size},
            "weight_map": dict(sorted(weight_map.items())),
        }, indent=2) + "\n")


# ------------------------------------------------------------------ pruned (LoRAPrune)

PRUNE_DIR = "prune"
PRUNE_MASKS = "masks.safetensors"
PRUNE_INFO = "prune.json"
# Architectures whose decoder layers are exactly LLaMA's q/k/v/o and gate/up/down projections,
# with one head count and one intermediate size in config.json (see _PrunePlan).
_PRUNABLE_MODEL_TYPES = ("llama",)
_LAYER_TENSOR = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.(weight|bias)$")
PRUNED_SCHEME = ("every layer is written at the widest layer's kept width (per structure); a layer that kept fewer "
                 "units keeps its kept units plus its lowest-index pruned ones, whose weights are exactly zero, so it "
                 "computes what the masked model computes. With exempt full-width layers (LoRAPrune exempts the "
                 "first 10% of layers and the last one) the model is therefore only as small as its widest layer; "
                 "the physical saving is full when no layer is exempt (prune.exempt_first_fraction=0 "
                 "prune.exempt_last=false)")


@dataclass
class _Slice:
    """How one base tensor is cut: keep ``index`` along ``dim``, then zero the kept positions ``zero``."""

    dim: int
    index: torch.Tensor  # long, ascending
    zero: torch.Tensor  # long, positions in the cut tensor along ``dim`` that are padding

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        cut = tensor.index_select(self.dim, self.index)
        if len(self.zero):
            cut.index_fill_(self.dim, self.zero, 0)
        return cut


@dataclass
class _PrunePlan:
    """The pruned export's cuts, read and checked before anything is written.

    transformers' LLaMA has one width for every layer: ``LlamaAttention`` builds q/k/v/o from
    ``config.num_attention_heads``, ``config.num_key_value_heads`` and ``config.head_dim``, and
    ``LlamaMLP`` gate/up/down from ``config.intermediate_size`` (transformers 5.x
    ``models/llama/modeling_llama.py``), with no per-layer override. LoRAPrune's masks differ by
    layer (its exempt layers keep full width), so every layer is written at the widest layer's
    kept count ``W_max`` (per structure, attention KV groups and MLP channels): a layer that kept
    fewer keeps its kept units plus ``W_max - kept`` of its pruned ones, lowest index first,
    with their weights (q/k/v rows and o_proj columns of a padded group, gate/up rows and the
    down_proj column of a padded channel, and their biases) set to exactly zero. A zero group
    has q = k = v = 0, so its attention output is 0 and adds nothing through its zero o_proj
    columns; a zero channel gives silu(0) * 0 = 0 through its zero down_proj column: the layer
    computes exactly what the masked model computes. With exempt full-width layers the export is
    only as small as the widest layer; the physical saving is full when no layer is exempt
    (``prune.exempt_first_fraction=0 prune.exempt_last=false``)."""

    config: dict  # the output config.json
    slices: dict[str, _Slice]  # base tensor name -> its cut (tensors not named are written whole)
    kept_groups: list[int]  # per layer, the KV groups the masks keep
    kept_channels: list[int]
    width_groups: int  # W_max: KV groups every layer is written with
    width_channels: int
    n_rep: int
    info: dict  # prune.json
    unpruned_params: int
    physical_params: int
    nonzero_params: int  # physical minus the padding zeros

    def shapes(self, tensors: dict[str, _BaseTensor]) -> dict[str, _BaseTensor]:
        """``tensors`` with the output shapes and sizes (for shard planning)."""
        out = {}
        for name, info in tensors.items():
            cut = self.slices.get(name)
            shape = list(info.shape)
            if cut is not None:
                shape[cut.dim] = len(cut.index)
            per = info.nbytes // max(math.prod(info.shape), 1)
            out[name] = _BaseTensor(info.file, shape, per * math.prod(shape))
        return out


def _prune_files(src: ExportSource) -> tuple[Path, Path]:
    """``prune/masks.safetensors`` and ``prune/prune.json`` next to the source's adapter."""
    prune = src.adapter_dir.parent / PRUNE_DIR
    masks, info = prune / PRUNE_MASKS, prune / PRUNE_INFO
    if not prune.is_dir():
        raise ExportError(f"{src.path}: no {PRUNE_DIR}/ directory: this {src.kind} was trained without a prune: "
                          "section, so there is nothing to prune; use --format merged")
    for f in (masks, info):
        if not f.is_file():
            raise ExportError(f"{f}: missing; the prune masks are incomplete (export another checkpoint, or "
                              "--format merged for the unpruned model)")
    return masks, info


def _plan_pruned(src: ExportSource, plan: _MergePlan) -> _PrunePlan:
    """Read the run's prune masks and check them against the base model's config and weights."""
    from safetensors.torch import load_file

    masks_file, info_file = _prune_files(src)
    config = _parsed(plan.model_dir / "config.json", _json_object)
    model_type = config.get("model_type")
    if model_type not in _PRUNABLE_MODEL_TYPES:
        raise ExportError(f"base model {plan.model_dir} is model_type {model_type!r}; the pruned export writes "
                          f"LLaMA-architecture models only ({', '.join(_PRUNABLE_MODEL_TYPES)}); use --format merged")
    try:
        hidden, heads, layers = int(config["hidden_size"]), int(config["num_attention_heads"]), \
            int(config["num_hidden_layers"])
        kv = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        inter = int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{plan.model_dir / 'config.json'}: no usable {e} setting; it is not a LLaMA config; "
                          "use --format merged") from None
    if heads % kv or int(config.get("pretraining_tp", 1) or 1) != 1:
        raise ExportError(f"{plan.model_dir / 'config.json'}: {heads} heads over {kv} KV heads (pretraining_tp "
                          f"{config.get('pretraining_tp', 1)}) is not a layout the pruned export can cut; "
                          "use --format merged")
    n_rep = heads // kv
    info = _parsed(info_file, _json_object)
    want = {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
            "intermediate_size": inter}
    for key, value in want.items():
        if info.get(key) != value:
            raise ExportError(f"{info_file}: {key} is {info.get(key)!r} but the base model {plan.model_dir} has "
                              f"{value}; these masks were made for another model (pass the base it trained on "
                              "with --base-model)")
    masks = _parsed(masks_file, lambda f: (_read_safetensors_header(f), load_file(f))[1])
    expected = {f"layers.{i}.{part}" for i in range(layers) for part in ("attn", "mlp")}
    if set(masks) != expected:
        odd = sorted(set(masks) ^ expected, key=str)[:3]
        raise ExportError(f"{masks_file}: tensors {odd} do not fit the base model's {layers} layers (want "
                          "layers.{i}.attn and layers.{i}.mlp for each); these masks were made for another model")

    # Expected shape of every per-layer projection (LlamaAttention / LlamaMLP).
    q_out, kv_out = heads * head_dim, kv * head_dim
    shapes = {("self_attn", "q"): [q_out, hidden], ("self_attn", "k"): [kv_out, hidden],
              ("self_attn", "v"): [kv_out, hidden], ("self_attn", "o"): [hidden, q_out],
              ("mlp", "gate"): [inter, hidden], ("mlp", "up"): [inter, hidden], ("mlp", "down"): [hidden, inter]}
    found: dict[tuple[int, str, str, str], str] = {}
    for name, t in plan.tensors.items():
        m = _LAYER_TENSOR.match(name)
        if m is None:
            continue
        layer, block, proj, kind = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        want_shape = shapes.get((block, proj))
        if want_shape is None or layer >= layers or \
                t.shape != (want_shape if kind == "weight" else want_shape[:1]):
            raise ExportError(f"base model tensor {name} has shape {t.shape}, not the LLaMA layout its config gives; "
                              "the pruned export cannot cut it; use --format merged")
        found[(layer, block, proj, kind)] = name
    missing = [f"layers.{i}.{b}.{p}_proj.weight" for i in range(layers) for (b, p) in shapes
               if (i, b, p, "weight") not in found]
    if missing:
        raise ExportError(f"base model {plan.model_dir} has no {missing[0]}: not a LLaMA-architecture model the "
                          "pruned export can cut; use --format merged")

    kept_sets: list[tuple[list[int], list[int]]] = []
    for i in range(layers):
        units = []
        for part, n, what in (("attn", kv, "KV groups"), ("mlp", inter, "MLP channels")):
            mask = masks[f"layers.{i}.{part}"]
            if list(mask.shape) != [n] or mask.is_floating_point() or mask.is_complex() or \
                    not bool(((mask == 0) | (mask == 1)).all()):
                raise ExportError(f"{masks_file}: layers.{i}.{part} has shape {list(mask.shape)} and dtype "
                                  f"{mask.dtype}; the base model needs 0/1 integers of shape [{n}] ({what}); these "
                                  "masks were made for another model")
            kept = [int(j) for j in torch.nonzero(mask).flatten()]
            if not kept:
                raise ExportError(f"{masks_file}: layer {i} keeps no {what}; a layer with none left cannot be "
                                  "written (train with a lower prune target sparsity, or export an earlier checkpoint)")
            units.append(kept)
        kept_sets.append((units[0], units[1]))
    width_g = max(len(g) for g, _ in kept_sets)
    # transformers' LlamaConfig refuses a hidden_size that num_attention_heads does not divide,
    # even with head_dim given (validate_architecture, 5.24); e.g. 6 kept groups of 4 heads on
    # hidden 4096. Widen to the next group count it accepts: more zero-padded groups, same output.
    hidden = int(config["hidden_size"])
    while hidden % (width_g * n_rep) != 0 and width_g < kv:
        width_g += 1
    if width_g > max(len(g) for g, _ in kept_sets):
        log.info("pruned export: %d KV groups kept at most, written as %d so that hidden_size %d divides by the "
                 "query heads (%d)", max(len(g) for g, _ in kept_sets), width_g, hidden, width_g * n_rep)
    width_c = max(len(c) for _, c in kept_sets)

    def chosen(kept: list[int], n: int, width: int) -> tuple[list[int], set[int]]:
        pruned = [j for j in range(n) if j not in set(kept)]
        pad = pruned[:width - len(kept)]  # lowest index first
        return sorted(kept + pad), set(pad)

    slices: dict[str, _Slice] = {}
    for i, (kept_g, kept_c) in enumerate(kept_sets):
        groups, pad_g = chosen(kept_g, kv, width_g)
        channels, pad_c = chosen(kept_c, inter, width_c)
        q_heads = [g * n_rep + r for g in groups for r in range(n_rep)]  # repeat_kv: head h uses KV head h // n_rep

        def rows(units, pad_units, step=head_dim):
            index = [u * step + d for u in units for d in range(step)]
            zero = [pos * step + d for pos, u in enumerate(units) if u in pad_units for d in range(step)]
            return torch.tensor(index, dtype=torch.long), torch.tensor(zero, dtype=torch.long)

        q_index, q_zero = rows(q_heads, {h for h in q_heads if h // n_rep in pad_g})
        kv_index, kv_zero = rows(groups, pad_g)
        c_index, c_zero = rows(channels, pad_c, step=1)
        cuts = {("self_attn", "q", "weight"): (0, q_index, q_zero), ("self_attn", "q", "bias"): (0, q_index, q_zero),
                ("self_attn", "k", "weight"): (0, kv_index, kv_zero), ("self_attn", "k", "bias"): (0, kv_index, kv_zero),
                ("self_attn", "v", "weight"): (0, kv_index, kv_zero), ("self_attn", "v", "bias"): (0, kv_index, kv_zero),
                ("self_attn", "o", "weight"): (1, q_index, q_zero),  # o_proj's bias is per output: untouched
                ("mlp", "gate", "weight"): (0, c_index, c_zero), ("mlp", "gate", "bias"): (0, c_index, c_zero),
                ("mlp", "up", "weight"): (0, c_index, c_zero), ("mlp", "up", "bias"): (0, c_index, c_zero),
                ("mlp", "down", "weight"): (1, c_index, c_zero)}  # down_proj's bias likewise
        for (block, proj, kind), (dim, index, zero) in cuts.items():
            name = found.get((i, block, proj, kind))
            if name is not None:
                slices[name] = _Slice(dim, index, zero)

    unpruned = physical = zeros = 0
    for name, t in plan.tensors.items():
        numel = math.prod(t.shape)
        unpruned += numel
        cut = slices.get(name)
        if cut is None:
            physical += numel
            continue
        per_index = numel // t.shape[cut.dim]
        physical += per_index * len(cut.index)
        zeros += per_index * len(cut.zero)

    out_config = {k: v for k, v in config.items() if k != "auto_map"}  # plain transformers, no remote code
    out_config.update({"num_attention_heads": width_g * n_rep, "num_key_value_heads": width_g,
                       "head_dim": head_dim, "intermediate_size": width_c})
    return _PrunePlan(out_config, slices, [len(g) for g, _ in kept_sets], [len(c) for _, c in kept_sets],
                      width_g, width_c, n_rep, info, unpruned, physical, physical - zeros)


# ------------------------------------------------------------------------ model card


def hub_base_model(src: ExportSource, base_model_id: Optional[str] = None) -> Optional[str]:
    """The model card's ``base_model``: a Hub id or None. ``base_model_id`` (``--base-model-id``)
    if given; for a builtin model the Hub repository it was converted from; for a model the run
    read from the Hub, its id; for a local directory None (the Hub would not know the path)."""
    from .model import BUILTIN_PREFIX

    if base_model_id is not None:
        return base_model_id
    path = src.base_model.get("path") or src.config.get("model", {}).get("path") or ""
    if path.startswith(BUILTIN_PREFIX):
        return BUILTIN_HUB_IDS.get(path[len(BUILTIN_PREFIX):])
    local = path.startswith(("/", ".", "~")) or os.path.isabs(path) or Path(path).exists()
    return path if HUB_ID.fullmatch(path) and not local else None


def check_card_metadata(text: str, want: dict) -> None:
    """The card's YAML metadata as the Hub reads it (``huggingface_hub.ModelCard``, offline):
    it must round-trip to ``want`` and its ``base_model``, if any, must be a Hub id."""
    from huggingface_hub import ModelCard

    data = ModelCard(text).data.to_dict()
    if data != want:
        raise ExportError(f"model card metadata does not round-trip: wrote {want}, read back {data}")
    base = data.get("base_model")
    if base is not None and not (isinstance(base, str) and HUB_ID.fullmatch(base)):
        raise ExportError(f"model card base_model {base!r} is not a Hub model id (owner/name)")


def model_card(src: ExportSource, fmt: str, base_model_id: Optional[str] = None,
               pruned: Optional[_PrunePlan] = None) -> str:
    """The export's ``README.md``: Hub metadata built with ``ModelCardData`` and checked
    (:func:`check_card_metadata`), then the settings, selection, metrics and how to load it;
    for ``pruned`` also the kept KV groups and MLP channels per layer, the uniform-width scheme
    and the physical, non-zero and unpruned parameter counts."""
    from huggingface_hub import ModelCardData

    cfg = src.config
    lora, drop = cfg.get("lora", {}), cfg.get("loradrop", {})
    hub_id = hub_base_model(src, base_model_id)
    base = hub_id or src.base_model.get("path") or cfg.get("model", {}).get("path")
    standalone = fmt in ("merged", "pruned")  # loads with transformers alone
    tags = ["lora", "loradrop", "loradrop_ds"] + (["merged"] if standalone else ["peft"]) + \
        (["pruned", "loraprune"] if fmt == "pruned" else [])
    title = {"merged": "merged model", "pruned": "pruned (LoRAPrune) merged model"}.get(fmt, "adapter")
    data = ModelCardData(base_model=hub_id, library_name="transformers" if standalone else "peft",
                         pipeline_tag="text-generation", tags=tags)
    metadata = data.to_dict()
    lines = ["---", data.to_yaml().rstrip("\n"), "---", "",
             f"# LoRA-drop {title} for {base}", "",
             f"Trained with [loradrop_ds](https://arxiv.org/abs/2402.07721)-style LoRA-drop on DeepSpeed ZeRO-3 "
             f"({src.kind} `{src.path.name}`, export format `{fmt}`).", "",
             "## Settings", "", "| setting | value |", "|---|---|",
             f"| LoRA r / alpha / dropout | {lora.get('r')} / {lora.get('alpha')} / {lora.get('dropout')} |",
             f"| target modules | {', '.join(lora.get('target_modules', []))} |",
             f"| LoRA-drop | {'on' if drop.get('enabled', True) else 'off (plain LoRA)'} |"]
    if drop.get("shared_scale", "none") != "none":
        lines += [f"| shared LoRA gain per use | {drop['shared_scale']}"
                  + (" (baked into each layer's B)" if fmt != "compact" else "") + " |"]
    if src.selection is not None:
        sel = src.selection
        lines += [f"| threshold T / sample ratio / sampling steps | {sel.threshold} / {drop.get('sample_ratio')} / "
                  f"{drop.get('sampling_steps')} |",
                  f"| granularity | {sel.granularity} |",
                  f"| kept layers | {sel.kept_layers} |", f"| shared layers | {sel.shared_layers} |"]
    trainable = src.results.get("trainable_params")
    plain = src.results.get("plain_lora_params")
    if trainable and plain:
        lines += [f"| trainable parameters | {trainable:,} ({100.0 * trainable / plain:.1f}% of plain LoRA's {plain:,}) |"]
    if src.selection is not None:
        kept = set(src.selection.kept)
        lines += ["", "## Selection", "", "| item | importance | LoRA |", "|---|---|---|"]
        lines += [f"| {item} | {imp:.4f} | {'own' if item in kept else 'shared'} |"
                  for item, imp in zip(src.selection.items, src.selection.importance, strict=True)]
        if src.importance_png is not None:
            lines += ["", "![importance per layer](importance.png)"]
    if pruned is not None:
        p = pruned
        sparsity = p.info.get("target_sparsity")
        lines += ["", "## Pruning (LoRAPrune)", "",
                  f"The base model's attention KV groups (a KV head with its {p.n_rep} query head(s)) and MLP channels "
                  f"were pruned by LoRAPrune masks during training (target sparsity {sparsity}, exempt layers "
                  f"{p.info.get('exempt_layers')}); the pruned units are removed here and the LoRA is merged.", "",
                  f"transformers' LLaMA has one width for all layers, so {PRUNED_SCHEME}. This export: every layer has "
                  f"{p.width_groups} KV groups ({p.width_groups * p.n_rep} query heads, head_dim "
                  f"{p.config['head_dim']}) and {p.width_channels} MLP channels.", "",
                  "| parameters | count |", "|---|---|",
                  f"| physical (stored) | {p.physical_params:,} ({100.0 * p.physical_params / p.unpruned_params:.1f}% "
                  "of unpruned) |",
                  f"| non-zero (physical minus padding zeros) | {p.nonzero_params:,} "
                  f"({100.0 * p.nonzero_params / p.unpruned_params:.1f}% of unpruned) |",
                  f"| unpruned base | {p.unpruned_params:,} |", "",
                  "| layer | KV groups kept | MLP channels kept |", "|---|---|---|"]
        lines += [f"| {i} | {g} of {p.width_groups} written | {c} of {p.width_channels} written |"
                  for i, (g, c) in enumerate(zip(p.kept_groups, p.kept_channels, strict=True))]
    metrics = {k: v for k, v in src.results.items() if k in ("zero_shot", "final") and v}
    if metrics:
        lines += ["", "## Evaluation", "", "| | " + " | ".join(sorted({m for v in metrics.values() for m in v})) + " |"]
        cols = sorted({m for v in metrics.values() for m in v})
        lines += ["|---|" + "---|" * len(cols)]
        lines += [f"| {name} | " + " | ".join(f"{v.get(c, float('nan')):.4f}" for c in cols) + " |"
                  for name, v in metrics.items()]
    if fmt == "peft":
        lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM",
                  "from peft import PeftModel",
                  f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{base}\"), REPO_OR_DIR)",
                  "```"]
    elif fmt == "compact":
        lines += ["", "## Use", "",
                  "Needs loradrop_ds (`loradrop_ds.export.load_compact`); for plain peft use the `peft` export.",
                  "", "```python", "from transformers import AutoModelForCausalLM",
                  "from loradrop_ds.export import load_compact",
                  f"model = load_compact(AutoModelForCausalLM.from_pretrained(\"{base}\"), DIR)", "```"]
    else:
        lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(REPO_OR_DIR)", "```"]
    text = "\n".join(lines) + "\n"
    check_card_metadata(text, metadata)
    return text


# ----------------------------------------------------------------------------- API


def export(source: str | os.PathLike, out: str | os.PathLike, fmt: str = "peft", *, base_model: Optional[str] = None,
           max_shard_size: str = "5GB", base_model_id: Optional[str] = None) -> Path:
    """Write ``fmt`` export of ``source`` to ``out`` (which must not exist or be empty).

    Every input is read and checked before anything is written (the settings, the source's
    files, the adapter, for ``merged`` and ``pruned`` the base's weight files and tokenizer,
    for ``pruned`` the prune masks against the base); on any
    error ``out`` and the directories above it are as they were, and the source is only read."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {list(FORMATS)}")
    merges = fmt in ("merged", "pruned")
    _shard_size_bytes(max_shard_size)  # a typo is refused whatever the format
    if base_model_id is not None and not HUB_ID.fullmatch(base_model_id):
        raise ExportError(f"--base-model-id {base_model_id!r}: not a Hub model id; give it as owner/name, "
                          "e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    src = open_source(source)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not empty; choose a new directory (nothing was written)")
    check_adapter(src.adapter_dir)
    if fmt == "compact" and src.selection is None:
        raise ExportError("format compact needs a LoRA-drop run (this run trained plain LoRA: nothing is shared); "
                          "use --format peft")
    if fmt == "pruned":
        _prune_files(src)  # a run trained without pruning is refused before the base is read
    base_dir = resolve_base_model(src, base_model) if (merges or base_model) else None
    plan = _plan_merged(src, base_dir, max_shard_size) if merges else None
    pruned = _plan_pruned(src, plan) if fmt == "pruned" else None
    card = model_card(src, fmt, base_model_id, pruned)

    parent = out.parent if str(out.parent) else Path(".")
    created = [d for d in (parent, *parent.parents) if not d.exists()]  # removed again if the export fails
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        _remove_empty(created)
        raise ExportError(f"--out {out}: cannot write there ({e.strerror}); choose a writable directory") from e
    try:
        if fmt == "peft":
            _write_peft(src, tmp)
        elif fmt == "compact":
            _write_compact(src, tmp)
        else:
            _write_merged(plan, tmp, pruned)
        if src.importance_png is not None:
            shutil.copy2(src.importance_png, tmp / "importance.png")
        if src.selection is not None:
            (tmp / "selection.json").write_text(src.selection.to_json())
        (tmp / "README.md").write_text(card)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = True, token: Optional[str] = None) -> str:
    """Create (private by default) or update a Hub model repository from ``folder``.

    The token comes from ``token``, ``HF_TOKEN`` or the user's ``hf auth login``;
    it is never printed or logged. Failure (no network, no permission) raises
    ExportError and leaves the local export untouched."""
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise ExportError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from e
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload LoRA-drop export (loradrop_ds)")
    except Exception as e:  # network, auth and HTTP errors come in many types
        # The message names the failure class only: exception texts can echo request headers.
        status = getattr(getattr(e, "response", None), "status_code", None)
        login = (" (not logged in, or the token may not write there: hf auth login, or set HF_TOKEN)"
                 if status in (401, 403) or type(e).__name__ == "LocalTokenNotFoundError" else "")
        raise ExportError(f"could not push to the Hub repository {repo_id!r} ({type(e).__name__}){login}; the local "
                          f"export in {folder} is complete: push it later with hf upload {repo_id} {folder}") from None
    return str(getattr(commit, "commit_url", repo_id))

