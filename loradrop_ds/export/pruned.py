"""The ``pruned`` format (LoRAPrune): the ``merged`` export with the pruned attention KV groups and
MLP channels cut out, as a per-tensor slice plan (:class:`_PruneCut`) read from the run's
prune masks (:mod:`loradrop_ds.prune_files`), checked against the base, and applied by the merge.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import parse_layer_key
from ..model_dims import attention_layout
from ..prune_files import INFO_FILE, MASKS_FILE, PRUNE_DIR, mask_key, read_info, read_masks
from .errors import ExportError, _json_object, _parsed, _read_safetensors_header
from .merge import _BaseTensor, _MergeJob
from .source import ExportSource

log = logging.getLogger(__package__)  # the export's one logger, loradrop_ds.export
# Architectures whose decoder layers are exactly LLaMA's q/k/v/o and gate/up/down projections,
# with one head count and one intermediate size in config.json (see _PruneCut).
_PRUNABLE_MODEL_TYPES = ("llama",)
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
class _PruneCut:
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

    def log_widths(self) -> None:
        """What the merge writes: the kept and the written widths, and the parameter counts."""
        log.info("pruning: KV groups kept per layer %s, MLP channels kept per layer %s; every layer is written with "
                 "%d KV groups (%d query heads) and %d channels: %s. Parameters: %s physical, %s non-zero, %s "
                 "unpruned", self.kept_groups, self.kept_channels, self.width_groups,
                 self.width_groups * self.n_rep, self.width_channels, PRUNED_SCHEME,
                 f"{self.physical_params:,}", f"{self.nonzero_params:,}", f"{self.unpruned_params:,}")


def _prune_files(src: ExportSource) -> tuple[Path, Path]:
    """``prune/masks.safetensors`` and ``prune/prune.json`` next to the source's adapter."""
    prune = src.adapter_dir.parent / PRUNE_DIR
    masks, info = prune / MASKS_FILE, prune / INFO_FILE
    if not prune.is_dir():
        raise ExportError(f"{src.path}: no {PRUNE_DIR}/ directory: this {src.kind} was trained without a prune: "
                          "section, so there is nothing to prune; use --format merged")
    for f in (masks, info):
        if not f.is_file():
            raise ExportError(f"{f}: missing; the prune masks are incomplete (export another checkpoint, or "
                              "--format merged for the unpruned model)")
    return masks, info


def _prune_cut(src: ExportSource, plan: _MergeJob) -> _PruneCut:
    """Read the run's prune masks and check them against the base model's config and weights."""
    masks_file, info_file = _prune_files(src)
    config = _parsed(plan.model_dir / "config.json", _json_object)
    model_type = config.get("model_type")
    if model_type not in _PRUNABLE_MODEL_TYPES:
        raise ExportError(f"base model {plan.model_dir} is model_type {model_type!r}; the pruned export writes "
                          f"LLaMA-architecture models only ({', '.join(_PRUNABLE_MODEL_TYPES)}); use --format merged")
    try:
        hidden, heads, layers = int(config["hidden_size"]), int(config["num_attention_heads"]), \
            int(config["num_hidden_layers"])
        kv, head_dim = attention_layout(hidden, heads, config.get("num_key_value_heads"), config.get("head_dim"))
        inter = int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{plan.model_dir / 'config.json'}: no usable {e} setting; it is not a LLaMA config; "
                          "use --format merged") from None
    if heads % kv or int(config.get("pretraining_tp", 1) or 1) != 1:
        raise ExportError(f"{plan.model_dir / 'config.json'}: {heads} heads over {kv} KV heads (pretraining_tp "
                          f"{config.get('pretraining_tp', 1)}) is not a layout the pruned export can cut; "
                          "use --format merged")
    n_rep = heads // kv
    info = _parsed(info_file, lambda f: _json_object(f, read_info))
    want = {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
            "intermediate_size": inter}
    for key, value in want.items():
        if info.get(key) != value:
            raise ExportError(f"{info_file}: {key} is {info.get(key)!r} but the base model {plan.model_dir} has "
                              f"{value}; these masks were made for another model (pass the base it trained on "
                              "with --base-model)")
    masks = _parsed(masks_file, lambda f: (_read_safetensors_header(f), read_masks(f))[1])
    expected = {mask_key(i, part) for i in range(layers) for part in ("attn", "mlp")}
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
        key = parse_layer_key(name)  # a per-layer projection of LlamaAttention / LlamaMLP, or skipped
        proj = key.module[:-len("_proj")] if key is not None and key.module.endswith("_proj") else None
        if proj is None or key.rest not in ("weight", "bias") or (key.block, proj) not in shapes:
            continue
        layer, block, kind = key.layer, key.block, key.rest
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
            mask = masks[mask_key(i, part)]
            if list(mask.shape) != [n] or mask.is_floating_point() or mask.is_complex() or \
                    not bool(((mask == 0) | (mask == 1)).all()):
                raise ExportError(f"{masks_file}: {mask_key(i, part)} has shape {list(mask.shape)} and dtype "
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
    return _PruneCut(out_config, slices, [len(g) for g, _ in kept_sets], [len(c) for _, c in kept_sets],
                      width_g, width_c, n_rep, info, unpruned, physical, physical - zeros)
