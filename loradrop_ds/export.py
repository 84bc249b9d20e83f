"""Exporting a finished run or any checkpoint, on CPU, without DeepSpeed or ranks.

Formats:

* ``peft``: the standard adapter; a shared LoRA is written under every layer that uses it,
  so ``PeftModel.from_pretrained`` loads it with no knowledge of LoRA-drop.
* ``compact``: each shared LoRA stored once, plus ``sharing.json`` (which layers use it);
  :func:`load_compact` rebuilds the tied model. Smaller than ``peft`` in proportion to the
  layers shared.
* ``merged``: LoRA merged into the base weights, saved as sharded safetensors in the base
  dtype with the tokenizer, loadable by ``AutoModelForCausalLM.from_pretrained``. Peak
  memory is the base model plus about one shard (``max_shard_size``) while writing.

Every export carries a model card (``README.md``). Exports are written to a temporary
directory and renamed into place, so a failed export leaves nothing half-written, and an
existing non-empty output directory is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from . import run_checkpoint as ckpt
from .importance import Selection, sharing_plan

log = logging.getLogger(__name__)
FORMATS = ("peft", "compact", "merged")
COMPACT_WEIGHTS = "loradrop_compact.safetensors"
SHARING_MAP = "sharing.json"


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
        state = ckpt.read_state(path)
        selection = Selection.from_dict(state.selection) if state.selection else None
        return ExportSource(path, "checkpoint", path / "adapter", state.config, selection, state.results,
                            state.base_model, None)
    if (path / "adapter" / "adapter_config.json").is_file() and (path / "config.yaml").is_file():
        config = yaml.safe_load((path / "config.yaml").read_text())
        sel = path / "selection.json"
        summary = path / "summary.json"
        results = json.loads(summary.read_text()) if summary.is_file() else {}
        newest = ckpt.list_checkpoints(path, warn=False)
        base = newest[0][1].base_model if newest else {"path": config["model"]["path"], "config_sha256": None}
        png = path / "importance.png"
        return ExportSource(path, "run", path / "adapter", config,
                            Selection.from_json(sel.read_text()) if sel.is_file() else None,
                            results, base, png if png.is_file() else None)
    found = ckpt.list_checkpoints(path, warn=True)
    if found:
        log.warning("%s has no final adapter (the run did not finish); exporting its newest checkpoint %s",
                    path, found[0][0])
        return open_source(found[0][0])
    raise ExportError(f"{path} is neither a loradrop_ds run (adapter/ and config.yaml) nor a checkpoint "
                      f"({ckpt.MARKER}); point at a run's output_dir or output_dir/checkpoints/<name>")


def resolve_base_model(src: ExportSource, base_model: Optional[str]) -> str:
    """The base model directory for merging/loading, checked against the one trained on."""
    from .model import BUILTIN_PREFIX, prepare_builtin_model, resolve_model_path

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
    weights = load_file(src.adapter_dir / "adapter_model.safetensors")
    plan = sharing_plan(src.selection)
    users: dict[str, list[int]] = {}
    for (layer, module), keep in sorted(plan.items()):
        if not keep:
            users.setdefault(module, []).append(layer)
    compact: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        where = _module_of(key, src.selection.module_names)
        if where is None or plan[(where[0], where[1])]:
            compact[key] = tensor  # a kept LoRA, stored as in the peft adapter
        elif where[0] == users[where[1]][0]:
            compact[f"shared.{where[1]}.{where[2]}.weight"] = tensor  # the shared LoRA, once
        else:
            template = key.replace(f"layers.{where[0]}.", f"layers.{users[where[1]][0]}.")
            if not torch.equal(tensor, weights[template]):
                raise ExportError(f"{key} should equal the shared LoRA in {template} but does not: "
                                  "the adapter does not match its selection")
    save_file(compact, out / COMPACT_WEIGHTS, metadata={"format": "pt"})
    shutil.copy2(src.adapter_dir / "adapter_config.json", out / "adapter_config.json")
    (out / SHARING_MAP).write_text(json.dumps({
        "num_layers": src.selection.num_layers, "module_names": src.selection.module_names,
        "granularity": src.selection.granularity, "kept": src.selection.kept, "shared_users": users,
        "key_template": "shared.{module}.{lora_A|lora_B}.weight stands for the LoRA of every (layer, module) in "
                        "shared_users; all other keys are as in a PEFT adapter",
    }, indent=2))


def load_compact(base_model: torch.nn.Module, compact_dir: str | os.PathLike) -> torch.nn.Module:
    """Rebuild the tied LoRA-drop model from a ``compact`` export on a plain base model."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from .lora import ADAPTER, lora_layers, tie_shared_lora

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
    tie_shared_lora(model, plan, train_shared=True)
    weights = load_file(compact_dir / COMPACT_WEIGHTS)
    layers = lora_layers(model, sharing["module_names"])
    with torch.no_grad():
        for key, tensor in weights.items():
            if key.startswith("shared."):
                _, module, ab, _ = key.split(".")
                owner = layers[(sharing["shared_users"][module][0], module)]
                getattr(owner, ab)[ADAPTER].weight.copy_(tensor)
            else:
                layer, module, ab = _module_of(key, sharing["module_names"])
                getattr(layers[(layer, module)], ab)[ADAPTER].weight.copy_(tensor)
    return model


def _write_merged(src: ExportSource, out: Path, base_dir: str, max_shard_size: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = bool(src.config.get("model", {}).get("trust_remote_code", False))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto", trust_remote_code=trust)
    merged = PeftModel.from_pretrained(base, src.adapter_dir).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tok_path = src.config.get("model", {}).get("tokenizer") or base_dir
    from .model import resolve_model_path

    AutoTokenizer.from_pretrained(resolve_model_path(tok_path), trust_remote_code=trust).save_pretrained(out)


# ------------------------------------------------------------------------ model card


def model_card(src: ExportSource, fmt: str) -> str:
    cfg = src.config
    lora, drop = cfg.get("lora", {}), cfg.get("loradrop", {})
    base = src.base_model.get("path") or cfg.get("model", {}).get("path")
    lines = ["---", f"base_model: {base}", "library_name: " + ("transformers" if fmt == "merged" else "peft"),
             "tags:", "- lora", "- loradrop", "- loradrop_ds", "---", "",
             f"# LoRA-drop {'merged model' if fmt == 'merged' else 'adapter'} for {base}", "",
             f"Trained with [loradrop_ds](https://arxiv.org/abs/2402.07721)-style LoRA-drop on DeepSpeed ZeRO-3 "
             f"({src.kind} `{src.path.name}`, export format `{fmt}`).", "",
             "## Settings", "", "| setting | value |", "|---|---|",
             f"| LoRA r / alpha / dropout | {lora.get('r')} / {lora.get('alpha')} / {lora.get('dropout')} |",
             f"| target modules | {', '.join(lora.get('target_modules', []))} |",
             f"| LoRA-drop | {'on' if drop.get('enabled', True) else 'off (plain LoRA)'} |"]
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
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- API


def export(source: str | os.PathLike, out: str | os.PathLike, fmt: str = "peft", *, base_model: Optional[str] = None,
           max_shard_size: str = "5GB") -> Path:
    """Write ``fmt`` export of ``source`` to ``out`` (which must not exist or be empty)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {list(FORMATS)}")
    src = open_source(source)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not empty; choose a new directory (nothing was written)")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write there ({e.strerror}); choose a writable directory") from e
    base_dir = resolve_base_model(src, base_model) if (fmt == "merged" or base_model) else None
    try:
        if fmt == "peft":
            _write_peft(src, tmp)
        elif fmt == "compact":
            _write_compact(src, tmp)
        else:
            _write_merged(src, tmp, base_dir, max_shard_size)
        if src.importance_png is not None:
            shutil.copy2(src.importance_png, tmp / "importance.png")
        if src.selection is not None:
            (tmp / "selection.json").write_text(src.selection.to_json())
        (tmp / "README.md").write_text(model_card(src, fmt))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = True, token: Optional[str] = None) -> str:
    """Create (private by default) or update a Hub model repository from ``folder``.

    The token comes from ``token``, ``HF_TOKEN`` or the user's ``huggingface-cli login``;
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
        raise ExportError(f"could not push to the Hub repository {repo_id!r} ({type(e).__name__}); the local "
                          f"export in {folder} is complete: push it later with --push-to-hub or huggingface-cli upload") from None
    return str(getattr(commit, "commit_url", repo_id))

