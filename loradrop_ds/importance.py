"""LoRA-drop's algorithm, free of DeepSpeed and of distributed state.

* :class:`ImportanceStats` holds the raw sampling-stage statistics: for every
  (layer, target module) pair the float64 sum over tokens of ``||scaling * B(A(x))||^2``
  and the number of tokens summed. Ranks add theirs together (see ``distributed.py``).
* :func:`compute_selection` normalises them into importances, ranks the items (layers, or
  (layer, module) pairs) by the chosen method (the paper's output norm, or a baseline:
  random, bottom, LoRA parameter norm, gradient norm, an explicit list) and keeps as many
  as the rule says: the items carrying a fraction ``threshold`` of the output norm, a fixed
  count, or the most important ones that fit a parameter budget (:func:`structure_params`).
* :func:`share_all_selection` is the family's cheapest point (``selection=share_all``): no
  item keeps its own LoRA, so it needs no statistics and no sampling stage.
* :func:`sampling_settled` decides when the sampling stage may stop (``sampling_steps=auto``):
  once the kept set stops changing (:func:`selection_settled`), or once the ranking does
  (:func:`ranking_settled`, on :func:`rank_correlation` between consecutive checks).
* :func:`sharing_plan` turns a selection into what the rebuild needs: for every
  (layer, module) pair, does it keep its own LoRA or use the shared one?
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import torch

# The allowed values of loradrop.granularity and loradrop.selection, owned here where they are
# implemented; config.py validates recipes against them.
GRANULARITIES = ("layer", "module")
SELECTION_METHODS = ("output_norm", "random", "bottom", "param_norm", "grad_norm", "list", "share_all")
# loradrop.auto_stop: what sampling_steps=auto waits for (sampling_settled).
AUTO_STOPS = ("kept_set", "ranking")
Granularity = Literal[GRANULARITIES]  # Literal of a tuple T is Literal[*T]
Method = Literal[SELECTION_METHODS]
AutoStop = Literal[AUTO_STOPS]


class SelectionError(ValueError):
    """The statistics cannot give a selection (all zero, or not finite)."""


@dataclass
class ImportanceStats:
    """Raw sums, shape ``[num_layers, num_modules]``, float64. ``grad_sq_sums`` (the
    ``grad_norm`` baseline's statistic: the sum over micro-batches of the squared norm of
    the LoRA weights' gradient) stays zero unless the recorder was asked for it."""

    module_names: list[str]
    sq_norm_sums: torch.Tensor
    token_counts: torch.Tensor
    grad_sq_sums: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.grad_sq_sums is None:
            self.grad_sq_sums = torch.zeros_like(self.sq_norm_sums)

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
        return ImportanceStats(self.module_names, self.sq_norm_sums + other.sq_norm_sums,
                               self.token_counts + other.token_counts, self.grad_sq_sums + other.grad_sq_sums)


@dataclass
class Selection:
    """Which items keep their own LoRA. Serialised as ``selection.json``."""

    granularity: Granularity
    threshold: float
    module_names: list[str]
    num_layers: int
    items: list[str]  # "7" (layer) or "7.q_proj" (layer.module), in layer order
    raw_sums: list[float]  # per item, summed over tokens of every rank ([] for share_all: no sampling stage)
    importance: list[float]  # raw_sums normalised to sum 1 ([] for share_all)
    token_count: int  # tokens seen per LoRA module in the sampling stage, all ranks
    kept: list[str]  # items that keep their own LoRA, in the method's order (output_norm: descending importance)
    shared: list[str]  # the others, in layer order
    method: str = "output_norm"  # how the items were ranked (loradrop.selection)
    scores: Optional[list[float]] = None  # param_norm / grad_norm: the per-item score ranked instead of raw_sums
    param_budget: Optional[float] = None  # the budget the kept items were chosen to fit, if any
    trainable_params: Optional[int] = None  # of the main stage's structure (kept + shared once + gains)
    # sampling_steps=auto: one entry per check, {"step", "kept", "scores" (per item, what that
    # check ranked), "rank_correlation"} (Spearman correlation of those scores with the final ones).
    history: list[dict] = field(default_factory=list)

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


def _item_scores(matrix: torch.Tensor, granularity: Granularity) -> list[float]:
    """Per-item sums of a ``[num_layers, num_modules]`` statistic (float64, exactly rounded)."""
    m = matrix.detach().to("cpu", torch.float64)
    if granularity == "layer":
        return [math.fsum(m[i].tolist()) for i in range(m.shape[0])]
    return m.reshape(-1).tolist()


def item_names(num_layers: int, module_names: Sequence[str], granularity: Granularity) -> list[str]:
    if granularity == "layer":
        return [str(i) for i in range(num_layers)]
    if granularity == "module":
        return [f"{i}.{m}" for i in range(num_layers) for m in module_names]
    raise ValueError(f"granularity must be 'layer' or 'module', got {granularity!r}")


@dataclass
class ParamCosts:
    """What a LoRA-drop structure trains, for ``param_budget``: ``r * (in + out)`` per
    module type, the shared LoRA (one per module type that has users, when trained) and
    the shared users' gains (``loradrop.shared_scale``: 0, 1 or r each)."""

    module_params: dict[str, int]
    num_layers: int
    train_shared: bool = True
    gain_per_use: int = 0


def make_plan(kept: Sequence[str], num_layers: int, module_names: Sequence[str], granularity: Granularity
              ) -> dict[tuple[int, str], bool]:
    """``{(layer, module): True if it keeps its own LoRA}`` for the kept items."""
    kept_set = set(kept)
    return {(layer, module): (str(layer) if granularity == "layer" else f"{layer}.{module}") in kept_set
            for layer in range(num_layers) for module in module_names}


def structure_params(plan: dict[tuple[int, str], bool], costs: ParamCosts) -> int:
    """Trainable parameters of the main stage built from ``plan``: every kept LoRA, each
    shared LoRA once (if trained), and one gain per shared use."""
    kept = sum(costs.module_params[m] for (_, m), own in plan.items() if own)
    users = Counter(m for (_, m), own in plan.items() if not own)
    shared = sum(costs.module_params[m] for m in users) if costs.train_shared else 0
    return kept + shared + costs.gain_per_use * sum(users.values())


def _ranked(method: Method, raw: list[float], scores: Optional[list[float]], seed: int) -> list[int]:
    """Item indices, most important first, by ``method`` (ties: lower index first)."""
    n = len(raw)
    if method == "output_norm":
        return sorted(range(n), key=lambda i: (-raw[i], i))
    if method == "bottom":
        return sorted(range(n), key=lambda i: (raw[i], i))
    if method == "random":
        generator = torch.Generator().manual_seed(seed)  # the same permutation on every machine
        return torch.randperm(n, generator=generator).tolist()
    if method in ("param_norm", "grad_norm"):
        if scores is None or len(scores) != n:
            raise ValueError(f"selection {method} needs one score per item")
        bad = [i for i, g in enumerate(scores) if not math.isfinite(g) or g < 0]
        if bad:
            raise SelectionError(f"the {method} scores are not finite for items {bad[:8]} (overflow or divergence in "
                                 "the sampling stage): lower loradrop.sampling_lr or train.lr")
        if math.fsum(scores) <= 0.0:
            raise SelectionError(f"all {method} scores are zero: raise loradrop.sampling_steps")
        return sorted(range(n), key=lambda i: (-scores[i], i))
    raise ValueError(f"selection must be one of {SELECTION_METHODS}, got {method!r}")


def compute_selection(stats: ImportanceStats, threshold: float, granularity: Granularity, *,
                      method: Method = "output_norm", param_scores: Optional[torch.Tensor] = None,
                      num_kept: Optional[int] = None, param_budget: Optional[float] = None,
                      costs: Optional[ParamCosts] = None, keep: Optional[Sequence[str | int]] = None,
                      seed: int = 0) -> Selection:
    """The items that keep their own LoRA.

    Ranking (``method``): ``output_norm`` by the recorded LoRA output norms (the paper),
    ``bottom`` the reverse, ``random`` a permutation seeded by ``seed``, ``param_norm`` by
    ``param_scores`` (``[num_layers, num_modules]``, e.g. ``||scaling * B A||_F^2``),
    ``grad_norm`` by ``stats.grad_sq_sums``; ``list`` keeps exactly ``keep``.
    How many: ``num_kept`` items; or, with ``param_budget``, the ranked items that fit
    ``param_budget`` times plain LoRA's trainable parameters (``costs``; each item in rank
    order is kept if the structure still fits, so a smaller one further down may fill the
    rest); otherwise as many as the paper's rule keeps at ``threshold`` on the output norms.
    """
    if method == "share_all":
        raise ValueError("selection share_all needs no statistics: call share_all_selection")
    raw = _item_scores(stats.sq_norm_sums, granularity)
    items = item_names(stats.num_layers, stats.module_names, granularity)
    importance = normalise(raw)  # validates the statistics for every method
    scores = None
    if method == "param_norm":
        if param_scores is None:
            raise ValueError("selection param_norm needs param_scores")
        scores = _item_scores(param_scores, granularity)
    elif method == "grad_norm":
        scores = _item_scores(stats.grad_sq_sums, granularity)

    def plan_of(kept: list[int]) -> dict[tuple[int, str], bool]:
        return make_plan([items[i] for i in kept], stats.num_layers, stats.module_names, granularity)

    if method == "list":
        if num_kept is not None or param_budget is not None:
            raise ValueError("selection list keeps exactly its items: no num_kept or param_budget")
        chosen = _listed(keep or [], items, granularity)
    else:
        order = _ranked(method, raw, scores, seed)
        if num_kept is not None:
            if not 1 <= num_kept <= len(items):
                raise SelectionError(f"loradrop.num_kept={num_kept} is not between 1 and the {len(items)} "
                                     f"{granularity}s there are")
            chosen = order[:num_kept]
        elif param_budget is not None:
            if costs is None:
                raise ValueError("param_budget needs costs")
            chosen = _fit_budget(order, plan_of, costs, param_budget)
        else:
            count = len(select_top(raw, threshold))
            chosen = order[:count]
    chosen_set = set(chosen)
    return Selection(
        granularity=granularity,
        threshold=threshold,
        module_names=list(stats.module_names),
        num_layers=stats.num_layers,
        items=items,
        raw_sums=raw,
        importance=importance,
        # Every LoRA module of a layer sees the same tokens; report one module's count.
        token_count=int(stats.token_counts.max().item()) if stats.token_counts.numel() else 0,
        kept=[items[i] for i in chosen],
        shared=[items[i] for i in range(len(items)) if i not in chosen_set],
        method=method,
        scores=scores,
        param_budget=param_budget,
        trainable_params=structure_params(plan_of(chosen), costs) if costs is not None else None,
    )


def share_all_selection(num_layers: int, module_names: Sequence[str], granularity: Granularity,
                        threshold: float, costs: Optional[ParamCosts] = None) -> Selection:
    """No item keeps its own LoRA: every layer uses the one shared LoRA per module type
    (ShareLoRA's and Tied-LoRA's structure; with ``shared_scale``, a learned gain per use).
    It ranks nothing, so it has no statistics and needs no sampling stage."""
    items = item_names(num_layers, module_names, granularity)
    return Selection(granularity=granularity, threshold=threshold, module_names=list(module_names),
                     num_layers=num_layers, items=items, raw_sums=[], importance=[], token_count=0, kept=[],
                     shared=list(items), method="share_all",
                     trainable_params=structure_params(make_plan([], num_layers, module_names, granularity), costs)
                     if costs is not None else None)


def _listed(keep: Sequence[str | int], items: list[str], granularity: Granularity) -> list[int]:
    names = [str(k) for k in keep]
    unknown = [k for k in names if k not in items]
    if unknown:
        example = "7" if granularity == "layer" else "7.q_proj"
        raise SelectionError(f"loradrop.keep names {unknown[:5]}, not {granularity}s of this model (there are "
                             f"{len(items)}: {items[0]} .. {items[-1]}); give items like {example}")
    if len(set(names)) != len(names):
        raise SelectionError(f"loradrop.keep lists an item twice: {names}")
    return [items.index(k) for k in names]


def _fit_budget(order: list[int], plan_of, costs: ParamCosts, param_budget: float) -> list[int]:
    """Greedy in rank order: keep an item if the whole structure still fits the budget."""
    plain = structure_params({key: True for key in plan_of([])}, costs)
    budget = math.floor(param_budget * plain)
    if budget >= plain:  # everything fits (item by item, a last shared user's gain could overshoot)
        return list(order)
    chosen: list[int] = []
    for i in order:
        if structure_params(plan_of(chosen + [i]), costs) <= budget:
            chosen.append(i)
    if structure_params(plan_of(chosen), costs) > budget:
        floor = structure_params(plan_of([]), costs)
        raise SelectionError(f"loradrop.param_budget={param_budget} allows {budget:,} trainable parameters, but sharing "
                             f"every item already needs {floor:,} ({floor / plain:.1%} of plain LoRA's {plain:,}): "
                             f"raise param_budget to at least {math.ceil(1000 * floor / plain) / 1000}")
    return chosen


def check_selection_request(method: Method, keep: Optional[Sequence[str | int]], num_kept: Optional[int],
                            param_budget: Optional[float], granularity: Granularity, num_layers: int,
                            module_names: Sequence[str], costs: ParamCosts) -> None:
    """The checks of :func:`compute_selection` that need no statistics, run before any
    training: listed items exist, the count is possible, the budget can hold a structure."""
    items = item_names(num_layers, module_names, granularity)
    if method == "list":
        _listed(keep or [], items, granularity)
    if num_kept is not None and not 1 <= num_kept <= len(items):
        raise SelectionError(f"loradrop.num_kept={num_kept} is not between 1 and the {len(items)} {granularity}s "
                             "there are")
    if param_budget is not None:
        everything = make_plan(items, num_layers, module_names, granularity)
        plain = structure_params(everything, costs)
        floor = structure_params(make_plan([], num_layers, module_names, granularity), costs)
        if floor > math.floor(param_budget * plain) and param_budget < 1.0:
            raise SelectionError(f"loradrop.param_budget={param_budget} allows {math.floor(param_budget * plain):,} "
                                 f"trainable parameters, but sharing every item already needs {floor:,} "
                                 f"({floor / plain:.1%} of plain LoRA's {plain:,}): raise param_budget to at least "
                                 f"{math.ceil(1000 * floor / plain) / 1000}")


def selection_settled(kept_history: Sequence[Sequence[str]], patience: int) -> bool:
    """True once the last ``patience`` checks kept the same items as the check before them
    (``sampling_steps=auto``)."""
    if len(kept_history) <= patience:
        return False
    last = set(kept_history[-1])
    return all(set(k) == last for k in kept_history[-patience - 1:])


def ranking_settled(score_history: Sequence[Sequence[float]], patience: int, min_correlation: float) -> bool:
    """True once each of the last ``patience`` checks ranked the items like the check before
    it: Spearman's correlation of consecutive checks' scores at least ``min_correlation``
    (``patience`` + 1 checks in all). A pair with a constant side has no correlation and
    does not count as settled."""
    if len(score_history) <= patience:
        return False
    recent = score_history[-patience - 1:]
    for before, after in zip(recent, recent[1:], strict=False):
        rho = rank_correlation(before, after)
        if rho is None or rho < min_correlation:
            return False
    return True


def sampling_settled(history: Sequence[dict], rule: AutoStop, patience: int, min_correlation: float) -> bool:
    """``sampling_steps=auto``'s stop after a check: ``history`` holds the checks so far
    (``{"kept", "scores"}`` each, both None for a check before any output was recorded,
    which is left out). ``kept_set``: the kept items unchanged for ``patience`` checks;
    ``ranking``: the ranking's scores unchanged in order (``min_correlation``) for as many."""
    checks = [h for h in history if h["kept"] is not None]
    if rule == "kept_set":
        return selection_settled([h["kept"] for h in checks], patience)
    if rule == "ranking":
        return ranking_settled([h["scores"] for h in checks], patience, min_correlation)
    raise ValueError(f"auto_stop must be one of {AUTO_STOPS}, got {rule!r}")


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation (average ranks for ties); None when either side is
    constant (e.g. the all-zero statistics of the first step)."""
    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    if len(a) != len(b) or len(a) < 2:
        raise ValueError("rank_correlation needs two sequences of equal length >= 2")
    ra, rb = ranks(a), ranks(b)
    ma, mb = math.fsum(ra) / len(ra), math.fsum(rb) / len(rb)
    cov = math.fsum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va, vb = math.fsum((x - ma) ** 2 for x in ra), math.fsum((y - mb) ** 2 for y in rb)
    if va == 0.0 or vb == 0.0:
        return None
    return cov / math.sqrt(va * vb)


def sharing_plan(selection: Selection) -> dict[tuple[int, str], bool]:
    """``{(layer, module): True if it keeps its own LoRA, False if it uses the shared one}``."""
    return make_plan(selection.kept, selection.num_layers, selection.module_names, selection.granularity)


def lora_param_count(in_features: int, out_features: int, r: int) -> int:
    return r * (in_features + out_features)
