"""LoRAPrune's algorithm (Zhang et al., arXiv 2305.18403), free of DeepSpeed and of distributed state.

LoRAPrune structurally prunes the frozen base model (attention head groups and MLP channels)
guided only by the LoRA weights and their gradients, so no gradient of the base weights is ever
formed. This module holds the arithmetic; the training loop gathers the weights and gradients,
calls it, and applies the masks.

Decisions (following the authors' released code where it is right, and fixing it where not):

1. Per-weight importance (:func:`weight_importance`): ``G = dB @ A + B @ dA - dB @ dA`` with
   ``dA, dB`` the gradients of the LoRA weights (they already carry ``scaling`` through the chain
   rule), and ``S = |G * (W + scaling * B @ A)|``. The *absolute value*, as in the authors'
   released code, not the paper's square: the released code is what produced their numbers, and a
   square lets a few outlier weights dominate a group sum. Computed in float32 whatever the input
   dtype (bf16 products of small gradients lose most of their bits).
2. Attention pruning unit = one KV group: a key/value head together with *all* the query heads that
   share it (``n_rep = num_heads // num_kv_heads``); query head ``h`` belongs to group ``h // n_rep``,
   the order of transformers' ``repeat_kv``. For MHA (``n_rep = 1``) a group is one head; under GQA
   (Llama-3, SmolLM2) the pruned model stays a valid GQA model with ``num_key_value_heads' = kept
   groups`` and ``num_attention_heads' = kept groups * n_rep``. (The authors' code hard-codes 32
   heads of size 128 and is wrong under GQA.) A group's score per module: the q_proj rows of its
   query heads, the k_proj / v_proj rows of its KV head, the o_proj *columns* of its query heads.
   MLP unit = one intermediate channel ``c``: gate_proj row ``c``, up_proj row ``c``, down_proj
   column ``c``.
3. Each module's group-score vector is divided by its L2 norm (a zero vector stays zero), then the
   vectors of the block's modules are summed (attention: q, k, v, o; MLP: gate, up, down). Only the
   modules LoRA targets contribute. :func:`module_group_scores` reduces one module's ``[out, in]``
   importance to its group vector straight away, so callers can drop the big matrix at once (it is
   as large as the weight: 0.9 GB in float32 for one 70B MLP projection).
4. Smoothing (:func:`ema_update`): ``ema * old + (1 - ema) * new``; an update with a NaN or inf is
   skipped, as the authors skip NaN updates.
5. Schedule (:func:`cubic_ratio`): 0 until ``start_fraction`` of training, cubic up to the target at
   ``end_fraction``, the target from then on (authors: 10% and 90%).
6. Exemption (:func:`exempt_layers`): the first ``int(first_fraction * num_layers)`` layers (the
   authors' rule, truncating) and, optionally, the last layer are never pruned.
7. Masks (True = kept, :func:`update_masks`): a uniform ratio within every non-exempt layer, as the
   authors prune; this also keeps the widths of all pruned layers equal, so a plain LlamaConfig can
   describe the pruned model. Masks only shrink; the newly pruned units are the lowest-scoring
   still-kept ones (ties: lower index first); at least one unit always stays.
8. :func:`pruned_param_count` counts the base parameters removed (LLaMA: no biases).
9. :class:`PruneState` holds the EMA scores, the masks and the update count, and flattens to a
   ``dict[str, Tensor]`` for a safetensors checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
STRUCTURES = ("attn", "mlp")

Masks = dict[int, dict[str, torch.Tensor]]
Scores = Mapping[int, Mapping[str, Optional[torch.Tensor]]]


def weight_importance(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor,
                      grad_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``|G * (W + scaling * B @ A)|`` with ``G = dB @ A + B @ dA - dB @ dA``, float32, ``[out, in]``.

    ``w``: ``[out, in]``; ``a``, ``grad_a``: ``[r, in]``; ``b``, ``grad_b``: ``[out, r]``. ``G`` stands
    in for the gradient of the merged weight, which is never formed (the base weight is frozen).
    """
    out_features, in_features = w.shape
    r = a.shape[0]
    if (a.shape != (r, in_features) or grad_a.shape != a.shape or b.shape != (out_features, r)
            or grad_b.shape != b.shape):
        raise ValueError(f"shapes do not fit W [out, in], A [r, in], B [out, r]: W {tuple(w.shape)}, "
                         f"A {tuple(a.shape)}, B {tuple(b.shape)}, dA {tuple(grad_a.shape)}, dB {tuple(grad_b.shape)}")
    w, a, b, grad_a, grad_b = (t.detach().float() for t in (w, a, b, grad_a, grad_b))
    g = grad_b @ a + b @ grad_a - grad_b @ grad_a
    return (g * (w + scaling * (b @ a))).abs()


def module_group_scores(name: str, s: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """One module's ``[out, in]`` importance summed per pruning unit (not normalised).

    Attention modules give ``[num_kv_heads]`` (one entry per KV group), MLP modules
    ``[intermediate]``; ``num_heads``, ``num_kv_heads`` and ``head_dim`` are only used for attention.
    """
    s = s.float()
    if name in ATTN_MODULES:
        _check_heads(num_heads, num_kv_heads)
        n_rep = num_heads // num_kv_heads
        if name == "q_proj":
            _check_dim(name, s, 0, num_heads * head_dim)
            # Rows h*head_dim .. (h+1)*head_dim are query head h = g*n_rep + j, in group g.
            return s.sum(dim=1).reshape(num_kv_heads, n_rep * head_dim).sum(dim=1)
        if name in ("k_proj", "v_proj"):
            _check_dim(name, s, 0, num_kv_heads * head_dim)
            return s.sum(dim=1).reshape(num_kv_heads, head_dim).sum(dim=1)
        # o_proj reads the concatenated query-head outputs: its input columns are the heads.
        _check_dim(name, s, 1, num_heads * head_dim)
        return s.sum(dim=0).reshape(num_kv_heads, n_rep * head_dim).sum(dim=1)
    if name in ("gate_proj", "up_proj"):
        return s.sum(dim=1)
    if name == "down_proj":
        return s.sum(dim=0)
    raise ValueError(f"unknown module {name!r}: expected one of {ATTN_MODULES + MLP_MODULES}")


def _check_heads(num_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")


def _check_dim(name: str, s: torch.Tensor, dim: int, expected: int) -> None:
    if s.dim() != 2 or s.shape[dim] != expected:
        side = "rows" if dim == 0 else "columns"
        raise ValueError(f"{name} importance has shape {tuple(s.shape)}; expected {expected} {side} "
                         "(num_heads / num_kv_heads / head_dim do not match the model?)")


def block_scores(group_vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each module's group vector divided by its L2 norm (a zero vector stays zero), summed.

    The normalisation keeps a module with large weights or gradients (e.g. the MLP's down_proj)
    from deciding alone; it is the authors' per-module normalisation.
    """
    if not group_vectors:
        raise ValueError("no module scores to combine (LoRA targets none of this block's modules?)")
    total: Optional[torch.Tensor] = None
    for name in sorted(group_vectors):  # a fixed order: the float sum is the same on every rank
        v = group_vectors[name].float()
        if total is not None and v.shape != total.shape:
            raise ValueError(f"module {name} has {tuple(v.shape)} group scores, the others {tuple(total.shape)}")
        norm = torch.linalg.vector_norm(v)
        v = torch.where(norm > 0, v / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(v))
        total = v if total is None else total + v
    assert total is not None
    return total


def _block_subset(module_scores: Mapping[str, torch.Tensor], block: tuple[str, ...],
                  kind: str) -> dict[str, torch.Tensor]:
    unknown = [n for n in module_scores if n not in ATTN_MODULES + MLP_MODULES]
    if unknown:
        raise ValueError(f"unknown modules {unknown}: expected names among {ATTN_MODULES + MLP_MODULES}")
    present = {n: s for n, s in module_scores.items() if n in block}
    if not present:
        raise ValueError(f"none of the {kind} modules {block} is in {sorted(module_scores)}")
    return present


def structure_scores(group_vectors: Mapping[str, torch.Tensor],
                     scored: Mapping[str, Sequence[str]]) -> dict[str, torch.Tensor]:
    """One layer's scores per structure (``"attn"``, ``"mlp"``): the :func:`block_scores` of
    the group vectors of that structure's scored modules that are present; a structure with
    none present gets no entry. ``group_vectors``: module name -> :func:`module_group_scores`.
    What ``prune_zero3.Pruner.update`` computes for every layer."""
    out = {}
    for structure, modules in scored.items():
        present = {m: v for m, v in group_vectors.items() if m in modules}
        if present:
            out[structure] = block_scores(present)
    return out


def attention_group_scores(module_scores: Mapping[str, torch.Tensor], num_heads: int, num_kv_heads: int,
                           head_dim: int) -> torch.Tensor:
    """``[num_kv_heads]`` scores of one attention block from the ``[out, in]`` importances of the
    attention modules present (MLP names are ignored, so one layer's dict can serve both):
    :func:`module_group_scores` then :func:`structure_scores`, as training computes them."""
    present = _block_subset(module_scores, ATTN_MODULES, "attention")
    vectors = {n: module_group_scores(n, s, num_heads, num_kv_heads, head_dim) for n, s in present.items()}
    return structure_scores(vectors, {"attn": ATTN_MODULES})["attn"]


def mlp_channel_scores(module_scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[intermediate]`` scores of one MLP block from the ``[out, in]`` importances of the MLP
    modules present (attention names are ignored), computed as :func:`attention_group_scores`."""
    present = _block_subset(module_scores, MLP_MODULES, "MLP")
    vectors = {n: module_group_scores(n, s, 0, 1, 0) for n, s in present.items()}
    return structure_scores(vectors, {"mlp": MLP_MODULES})["mlp"]


def ema_update(old: Optional[torch.Tensor], new: torch.Tensor, ema: float) -> Optional[torch.Tensor]:
    """``ema * old + (1 - ema) * new``; the first update (``old`` None) is ``new`` itself.

    An update containing NaN or inf is skipped (``old`` is returned, None if there was none): one
    overflowing step must not poison the running scores, and the authors skip NaN updates too.
    """
    if not 0.0 <= ema <= 1.0:
        raise ValueError(f"ema must be in [0, 1], got {ema}")
    if not bool(torch.isfinite(new).all()):
        return old
    if old is None:
        return new.detach().clone()
    if old.shape != new.shape:
        raise ValueError(f"score shapes differ: running {tuple(old.shape)}, new {tuple(new.shape)}")
    return ema * old + (1.0 - ema) * new.detach().to(old.dtype)


def cubic_ratio(step: int, total_steps: int, target: float, start_fraction: float = 0.1,
                end_fraction: float = 0.9) -> float:
    """Fraction of units to have pruned at ``step``: 0 before ``t0 = start_fraction * total_steps``,
    ``target * (1 - (1 - p)**3)`` with ``p = (step - t0) / (t1 - t0)`` up to
    ``t1 = end_fraction * total_steps``, ``target`` from ``t1`` on.

    The cubic prunes fastest early, while the model has the most steps left to recover.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= start_fraction <= end_fraction <= 1.0:
        raise ValueError(f"need 0 <= start_fraction <= end_fraction <= 1, got {start_fraction}, {end_fraction}")
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target must be in [0, 1], got {target}")
    t0 = start_fraction * total_steps
    t1 = end_fraction * total_steps
    if step >= t1:
        return float(target)
    if step < t0:
        return 0.0
    p = (step - t0) / (t1 - t0)
    return float(target * (1.0 - (1.0 - p) ** 3))


def exempt_layers(num_layers: int, first_fraction: float, exempt_last: bool) -> list[int]:
    """Layers never pruned, ascending: the first ``int(first_fraction * num_layers)`` (the authors'
    rule, truncating: 10% of 32 layers exempts 3) and the last one when ``exempt_last``."""
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if not 0.0 <= first_fraction <= 1.0:
        raise ValueError(f"first_fraction must be in [0, 1], got {first_fraction}")
    layers = set(range(int(first_fraction * num_layers)))
    if exempt_last:
        layers.add(num_layers - 1)
    return sorted(layers)


def initial_masks(num_layers: int, num_kv_heads: int, intermediate_size: int) -> Masks:
    """Every unit kept: ``{layer: {"attn": [num_kv_heads] True, "mlp": [intermediate_size] True}}``."""
    return {i: {"attn": torch.ones(num_kv_heads, dtype=torch.bool),
                "mlp": torch.ones(intermediate_size, dtype=torch.bool)} for i in range(num_layers)}


def num_to_prune(ratio: float, n: int) -> int:
    """``floor(ratio * n + 1e-9)``, at most ``n - 1``. The epsilon absorbs float error
    (``0.29 * 100 = 28.999999999999996`` prunes 29)."""
    return max(0, min(n - 1, math.floor(ratio * n + 1e-9)))


def update_masks(masks: Masks, scores: Scores, ratio: float, exempt: Sequence[int]) -> Masks:
    """New masks (the inputs are not changed) in which every non-exempt layer has
    :func:`num_to_prune` ``(ratio, N)`` of each structure's ``N`` units pruned.

    Already-pruned units stay pruned (masks only shrink, so a lower ratio changes nothing); the newly
    pruned ones are the lowest-scoring still-kept units, ties broken by lower index first. A structure
    whose score is absent or None in a layer (LoRA does not target its modules, or no finite update
    has arrived yet) is left as it is; a non-exempt layer missing from ``scores`` is an error. Exempt
    layers are returned unchanged (all True, from :func:`initial_masks`).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    exempt_set = set(exempt)
    new: Masks = {}
    for layer, structures in masks.items():
        new[layer] = {}
        if layer not in exempt_set and layer not in scores:
            raise ValueError(f"no scores for layer {layer}, which is not exempt")
        for name, mask in structures.items():
            mask = mask.detach().clone().bool()
            score = None if layer in exempt_set else scores[layer].get(name)
            if score is not None:
                mask = _prune_lowest(mask, score, num_to_prune(ratio, mask.numel()), f"layer {layer} {name}")
            new[layer][name] = mask
    return new


def _prune_lowest(mask: torch.Tensor, score: torch.Tensor, target: int, where: str) -> torch.Tensor:
    if score.shape != mask.shape:
        raise ValueError(f"{where}: {tuple(score.shape)} scores for {tuple(mask.shape)} units")
    score = score.detach().to(mask.device, torch.float32)
    if not bool(torch.isfinite(score).all()):
        raise ValueError(f"{where}: scores are not finite")
    need = target - int((~mask).sum())
    if need <= 0:
        return mask
    kept = torch.nonzero(mask).flatten()  # ascending, so the stable sort breaks ties by lower index
    order = torch.sort(score[kept], stable=True).indices
    mask[kept[order[:need]]] = False
    return mask


def mask_sparsity(masks: Masks) -> dict[str, float]:
    """Fraction of units pruned per structure, over *all* layers (exempt ones included, so it is
    the fraction of the model's heads / channels removed, not the per-layer ratio)."""
    pruned: dict[str, int] = {}
    total: dict[str, int] = {}
    for structures in masks.values():
        for name, mask in structures.items():
            pruned[name] = pruned.get(name, 0) + int((~mask.bool()).sum())
            total[name] = total.get(name, 0) + mask.numel()
    return {name: pruned[name] / total[name] if total[name] else 0.0 for name in total}


def pruned_param_count(masks: Masks, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, int]:
    """Base-model parameters removed: ``{"attn": ..., "mlp": ..., "total": ...}`` (LLaMA: no biases).

    A removed KV group takes ``n_rep * head_dim`` rows of q_proj, ``head_dim`` rows of k_proj and of
    v_proj and ``n_rep * head_dim`` columns of o_proj; a removed channel one row of gate_proj and of
    up_proj and one column of down_proj. Every row / column holds ``hidden`` weights.
    """
    _check_heads(num_heads, num_kv_heads)
    n_rep = num_heads // num_kv_heads
    per_group = (2 * n_rep * head_dim + 2 * head_dim) * hidden
    per_channel = 3 * hidden
    attn = mlp = 0
    for structures in masks.values():
        if "attn" in structures:
            attn += int((~structures["attn"].bool()).sum()) * per_group
        if "mlp" in structures:
            mlp += int((~structures["mlp"].bool()).sum()) * per_channel
    return {"attn": attn, "mlp": mlp, "total": attn + mlp}


@dataclass
class PruneState:
    """Everything LoRAPrune carries between steps: the EMA scores (None until a finite update),
    the masks, and how many score updates were applied.

    ``to_tensors`` / ``from_tensors`` flatten it to ``{"scores.3.attn", "masks.3.mlp", ...,
    "updates"}`` for a safetensors checkpoint (masks as uint8, which every reader handles; None
    scores are left out and come back as None for every structure the masks have).
    """

    scores: dict[int, dict[str, Optional[torch.Tensor]]]
    masks: Masks
    updates: int = 0

    @classmethod
    def new(cls, masks: Masks) -> PruneState:
        return cls({layer: {name: None for name in structures} for layer, structures in masks.items()}, masks, 0)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"updates": torch.tensor([self.updates], dtype=torch.int64)}
        for layer, structures in self.masks.items():
            for name, mask in structures.items():
                out[f"masks.{layer}.{name}"] = mask.detach().to(torch.uint8).contiguous().clone()
        for layer, structures in self.scores.items():
            for name, score in structures.items():
                if name not in self.masks.get(layer, {}):
                    # from_tensors rebuilds the score keys from the masks; anything else would not round-trip.
                    raise ValueError(f"scores for layer {layer} {name}, which has no mask")
                if score is not None:
                    out[f"scores.{layer}.{name}"] = score.detach().contiguous().clone()
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> PruneState:
        masks: Masks = {}
        found: dict[tuple[int, str], torch.Tensor] = {}
        for key, t in tensors.items():
            if key == "updates":
                continue
            kind, layer, name = _split_key(key)
            if kind == "masks":
                masks.setdefault(layer, {})[name] = t.bool()
            else:
                found[(layer, name)] = t
        stray = [k for k in found if k[1] not in masks.get(k[0], {})]
        if stray:
            raise ValueError(f"scores without masks: {stray[:5]}")
        masks = {layer: dict(sorted(masks[layer].items())) for layer in sorted(masks)}
        scores = {layer: {name: found.get((layer, name)) for name in structures} for layer, structures in masks.items()}
        if "updates" not in tensors:
            raise ValueError("no 'updates' entry: not a PruneState")
        return cls(scores, masks, int(tensors["updates"].reshape(-1)[0]))


def _split_key(key: str) -> tuple[str, int, str]:
    parts = key.split(".")
    if len(parts) != 3 or parts[0] not in ("masks", "scores") or not parts[1].isdigit():
        raise ValueError(f"unexpected PruneState key {key!r}")
    return parts[0], int(parts[1]), parts[2]
