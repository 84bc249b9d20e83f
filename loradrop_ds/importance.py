"""LoRA-drop's algorithm, free of DeepSpeed and of distributed state.

* :class:`ImportanceStats` holds the raw sampling-stage statistics: for every
  (layer, target module) pair the float64 sum over tokens of ``||scaling * B(A(x))||^2``
  and the number of tokens summed. Ranks add theirs together (see ``distributed.py``).
* :func:`compute_selection` normalises them into importances and keeps the items
  (layers, or (layer, module) pairs) that carry a fraction ``threshold`` of the total.
* :func:`sharing_plan` turns a selection into what the rebuild needs: for every
  (layer, module) pair, does it keep its own LoRA or use the shared one?
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch

Granularity = Literal["layer", "module"]


class SelectionError(ValueError):
    """The statistics cannot give a selection (all zero, or not finite)."""


@dataclass
class ImportanceStats:
    """Raw sums, shape ``[num_layers, num_modules]``, float64."""

    module_names: list[str]
    sq_norm_sums: torch.Tensor
    token_counts: torch.Tensor

    @classmethod
    def zeros(cls, num_layers: int, module_names: Sequence[str], device: torch.device | str = "cpu") -> ImportanceStats:
        shape = (num_layers, len(module_names))
        return cls(
            list(module_names),
            torch.zeros(shape, dtype=torch.float64, device=device),
            torch.zeros(shape, dtype=torch.float64, device=device),
        )

    @property
    def num_layers(self) -> int:
        return int(self.sq_norm_sums.shape[0])

    def add(self, layer: int, module: int, sq_norm_sum: torch.Tensor, tokens: torch.Tensor | int) -> None:
        """Accumulate without a host sync (tensors stay on their device)."""
        self.sq_norm_sums[layer, module] += sq_norm_sum.to(torch.float64)
        self.token_counts[layer, module] += tokens if isinstance(tokens, int) else tokens.to(torch.float64)

    def merged(self, other: ImportanceStats) -> ImportanceStats:
        assert self.module_names == other.module_names, (self.module_names, other.module_names)
        return ImportanceStats(self.module_names, self.sq_norm_sums + other.sq_norm_sums, self.token_counts + other.token_counts)


@dataclass
class Selection:
    """Which items keep their own LoRA. Serialised as ``selection.json``."""

    granularity: Granularity
    threshold: float
    module_names: list[str]
    num_layers: int
    items: list[str]  # "7" (layer) or "7.q_proj" (layer.module), in layer order
    raw_sums: list[float]  # per item, summed over tokens of every rank
    importance: list[float]  # raw_sums normalised to sum 1
    token_count: int  # tokens seen per LoRA module in the sampling stage, all ranks
    kept: list[str]  # items that keep their own LoRA, in descending importance
    shared: list[str]  # the others, in layer order

    @property
    def kept_layers(self) -> list[int]:
        """Layers in which at least one module keeps its own LoRA, ascending."""
        return sorted({int(item.split(".")[0]) for item in self.kept})

    @property
    def shared_layers(self) -> list[int]:
        """Layers in which at least one module uses the shared LoRA, ascending."""
        return sorted({int(item.split(".")[0]) for item in self.shared})

    def to_json(self) -> str:
        d = asdict(self)
        d["kept_layers"] = self.kept_layers
        d["shared_layers"] = self.shared_layers
        return json.dumps(d, indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> Selection:
        """Inverse of ``json.loads(to_json())`` (the derived layer lists are dropped)."""
        return cls(**{k: v for k, v in d.items() if k not in ("kept_layers", "shared_layers")})

    @classmethod
    def from_json(cls, text: str) -> Selection:
        return cls.from_dict(json.loads(text))

    def fingerprint(self) -> str:
        """A digest of what the rebuild depends on, for the cross-rank agreement check."""
        key = json.dumps([self.granularity, self.module_names, self.num_layers, sorted(self.kept)])
        return hashlib.sha256(key.encode()).hexdigest()


def normalise(raw: Sequence[float]) -> list[float]:
    """``I_i = g_i / sum_j g_j``; errors on statistics that cannot be normalised."""
    if len(raw) == 0:
        raise SelectionError("no LoRA statistics were recorded (no layers)")
    bad = [i for i, g in enumerate(raw) if not math.isfinite(g) or g < 0]
    if bad:
        raise SelectionError(
            f"the sampling stage's LoRA output statistics are not finite (overflow or divergence) or negative for items "
            f"{bad[:8]}: lower loradrop.sampling_lr (or train.lr when it is unset), keep train.max_grad_norm > 0, "
            "and use model.dtype=bfloat16 or float32; check the data if it persists"
        )
    total = math.fsum(raw)
    if total <= 0.0:
        raise SelectionError(
            "all LoRA output statistics are zero: the LoRA B matrices never left zero. "
            "Raise loradrop.sampling_steps (the first step always records zero because B starts at 0) "
            "or loradrop.sampling_lr"
        )
    return [g / total for g in raw]


def select_top(raw: Sequence[float], threshold: float) -> list[int]:
    """Indices kept, in descending importance: the shortest prefix of the items sorted
    by importance (ties broken by lower index first) whose share of the total reaches
    ``threshold``. At least one item is always kept."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    normalise(raw)  # same validation and error messages
    order = sorted(range(len(raw)), key=lambda i: (-raw[i], i))
    # Compare raw sums with math.fsum (exactly rounded) rather than accumulating
    # normalised floats, so T = 1.0 keeps every non-zero item and no float drift
    # decides a borderline layer.
    target = threshold * math.fsum(raw)
    kept: list[int] = []
    for i in order:
        kept.append(i)
        if math.fsum(raw[j] for j in kept) >= target:
            break
    return kept


def compute_selection(stats: ImportanceStats, threshold: float, granularity: Granularity) -> Selection:
    sums = stats.sq_norm_sums.detach().to("cpu", torch.float64)
    counts = stats.token_counts.detach().to("cpu", torch.float64)
    num_layers, num_modules = sums.shape
    if granularity == "layer":
        items = [str(i) for i in range(num_layers)]
        raw = [math.fsum(sums[i].tolist()) for i in range(num_layers)]
    elif granularity == "module":
        items = [f"{i}.{m}" for i in range(num_layers) for m in stats.module_names]
        raw = sums.reshape(-1).tolist()
    else:
        raise ValueError(f"granularity must be 'layer' or 'module', got {granularity!r}")
    kept_idx = select_top(raw, threshold)
    kept_set = set(kept_idx)
    return Selection(
        granularity=granularity,
        threshold=threshold,
        module_names=list(stats.module_names),
        num_layers=num_layers,
        items=items,
        raw_sums=raw,
        importance=normalise(raw),
        # Every LoRA module of a layer sees the same tokens; report one module's count.
        token_count=int(counts.max().item()) if counts.numel() else 0,
        kept=[items[i] for i in kept_idx],
        shared=[items[i] for i in range(len(items)) if i not in kept_set],
    )


def sharing_plan(selection: Selection) -> dict[tuple[int, str], bool]:
    """``{(layer, module): True if it keeps its own LoRA, False if it uses the shared one}``."""
    kept = set(selection.kept)
    plan = {}
    for layer in range(selection.num_layers):
        for module in selection.module_names:
            item = str(layer) if selection.granularity == "layer" else f"{layer}.{module}"
            plan[(layer, module)] = item in kept
    return plan


def lora_param_count(in_features: int, out_features: int, r: int) -> int:
    return r * (in_features + out_features)
