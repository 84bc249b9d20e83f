"""The export's model card (``README.md``): its Hub metadata, checked as the Hub reads it
(:func:`check_card_metadata`), and its text (:func:`model_card`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .errors import ExportError
from .pruned import PRUNED_SCHEME, _PruneCut
from .source import ExportSource

# The Hub repository each builtin model was converted from: the model card's ``base_model``.
BUILTIN_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name, as the Hub's model card metadata wants base_model


def hub_base_model(src: ExportSource, base_model_id: Optional[str] = None) -> Optional[str]:
    """The model card's ``base_model``: a Hub id or None. ``base_model_id`` (``--base-model-id``)
    if given; for a builtin model the Hub repository it was converted from; for a model the run
    read from the Hub, its id; for a local directory None (the Hub would not know the path)."""
    from ..model import BUILTIN_PREFIX

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
               pruned: Optional[_PruneCut] = None) -> str:
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
        if sel.method == "share_all":
            lines += ["| selection | share_all (no sampling stage) |"]
        else:
            lines += [f"| selection | {sel.method} |",
                      f"| threshold T / sample ratio / sampling steps | {sel.threshold} / {drop.get('sample_ratio')} / "
                      f"{drop.get('sampling_steps')} |"]
        lines += [f"| granularity | {sel.granularity} |",
                  f"| kept layers | {sel.kept_layers} |", f"| shared layers | {sel.shared_layers} |"]
    trainable = src.results.get("trainable_params")
    plain = src.results.get("plain_lora_params")
    if trainable and plain:
        lines += [f"| trainable parameters | {trainable:,} ({100.0 * trainable / plain:.1f}% of plain LoRA's {plain:,}) |"]
    if src.selection is not None:
        kept = set(src.selection.kept)
        lines += ["", "## Selection", ""]
        if src.selection.importance:
            lines += ["| item | importance | LoRA |", "|---|---|---|"]
            lines += [f"| {item} | {imp:.4f} | {'own' if item in kept else 'shared'} |"
                      for item, imp in zip(src.selection.items, src.selection.importance, strict=True)]
        else:  # share_all: nothing measured
            lines += [f"Every {src.selection.granularity} uses the shared LoRA (selection {src.selection.method}: no "
                      "sampling stage, no importance measured)."]
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
