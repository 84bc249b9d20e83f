"""PNG chart of LoRA-drop importance scores and the resulting keep/share split."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_write_file, atomic_write_text

KEPT_COLOUR = "tab:blue"
SHARED_COLOUR = "tab:gray"


def _validate(labels: list[str], importance: list[float], kept: list[bool], threshold: float) -> None:
    if not labels:
        raise ValueError("plot_importance: need at least one item, got empty labels")
    if not (len(labels) == len(importance) == len(kept)):
        raise ValueError(
            "plot_importance: labels, importance and kept must have equal lengths, got "
            f"{len(labels)}, {len(importance)} and {len(kept)}"
        )
    bad = [i for i, v in enumerate(importance) if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(
            f"plot_importance: importance must be finite and non-negative; bad indices {bad[:10]}"
        )
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"plot_importance: threshold must be in [0, 1], got {threshold!r}")


def plot_importance(
    path: str | os.PathLike,
    labels: list[str],
    importance: list[float],
    kept: list[bool],
    threshold: float,
    title: str = "LoRA-drop layer importance",
) -> None:
    """Write a PNG with per-item normalised importance (top) and the cumulative
    share of items sorted by importance (bottom).

    Bars stay in the given (layer) order so the chart reads like the model; the
    cumulative curve is in rank order because that is how the threshold selects.
    """
    importance = [float(v) for v in importance]
    kept = [bool(k) for k in kept]
    labels = [str(s) for s in labels]
    _validate(labels, importance, kept, threshold)

    # Lazy import: matplotlib is only needed when a plot is actually requested.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise RuntimeError(
            "plot_importance needs matplotlib: pip install matplotlib"
        ) from exc

    n = len(labels)
    total = sum(importance)
    # All-zero scores would divide by zero; an all-zero chart is the honest picture.
    share = [v / total for v in importance] if total > 0 else [0.0] * n
    ranked = sorted(share, reverse=True)
    cumulative: list[float] = []
    running = 0.0
    for v in ranked:
        running += v
        cumulative.append(running)
    n_kept = sum(kept)

    # Explicit Figure + Agg canvas instead of pyplot: no global backend/figure
    # state is touched, so this is safe inside a (possibly multi-threaded) trainer.
    fig = Figure(figsize=(max(6.0, 0.3 * n + 2.0), 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax_bar, ax_cum = fig.subplots(2, 1, height_ratios=[3, 1])

    xs = list(range(n))
    ax_bar.bar(xs, share, color=[KEPT_COLOUR if k else SHARED_COLOUR for k in kept])
    ax_bar.set_xticks(xs)
    many = n > 12
    ax_bar.set_xticklabels(labels, rotation=90 if many else 0, fontsize=7 if many else 9)
    ax_bar.set_xlim(-0.6, n - 0.4)
    ax_bar.set_ylabel("normalised importance")
    ax_bar.set_title(title)
    # Explicit handles so both entries show even when one category is empty.
    ax_bar.legend(
        handles=[
            Patch(color=KEPT_COLOUR, label="own LoRA (kept)"),
            Patch(color=SHARED_COLOUR, label="shared LoRA"),
        ],
        loc="upper right",
    )

    ranks = list(range(1, n + 1))
    ax_cum.plot(ranks, cumulative, marker="o", markersize=3, color=KEPT_COLOUR)
    ax_cum.axhline(threshold, linestyle="--", color="tab:red", label=f"threshold {threshold:g}")
    ax_cum.axvline(n_kept, linestyle=":", color="black", label=f"kept {n_kept}/{n}")
    ax_cum.set_xlim(0.5, n + 0.5)
    ax_cum.set_ylim(0.0, 1.05)
    ax_cum.set_xlabel("rank (descending importance)")
    ax_cum.set_ylabel("cumulative share")
    ax_cum.legend(loc="lower right", fontsize=8)

    _save_atomic(fig, path)


def plot_selection_history(path: str | os.PathLike, labels: list[str], history: list[dict]) -> None:
    """PNG of the sampling stage's selection checks: which items were kept at each check
    (top; a column per check) and the rank correlation of each check's scores with the
    final ones (bottom). ``history`` entries: ``{"step", "kept" (list or None: no
    statistics yet), "rank_correlation" (or None)}``."""
    if not history:
        raise ValueError("plot_selection_history: empty history")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [str(s) for s in labels]
    steps = [int(h["step"]) for h in history]
    grid = [[1.0 if h["kept"] is not None and label in h["kept"] else 0.0 for h in history] for label in labels]
    fig = Figure(figsize=(max(6.0, 0.35 * len(steps) + 3.0), max(4.0, 0.12 * len(labels) + 3.0)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax_kept, ax_corr = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax_kept.imshow(grid, aspect="auto", cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest",
                   extent=(-0.5, len(steps) - 0.5, len(labels) - 0.5, -0.5))
    ax_kept.set_yticks(range(len(labels)))
    ax_kept.set_yticklabels(labels, fontsize=6 if len(labels) > 24 else 8)
    ax_kept.set_ylabel("item (blue: own LoRA)")
    ax_kept.set_title("LoRA-drop selection at each sampling-stage check")
    corr = [h.get("rank_correlation") for h in history]
    xs = [i for i, c in enumerate(corr) if c is not None]
    ax_corr.plot(xs, [corr[i] for i in xs], marker="o", color=KEPT_COLOUR)
    ax_corr.set_ylim(-1.05, 1.05)
    ax_corr.set_ylabel("rank corr.\nwith final")
    ax_corr.set_xticks(range(len(steps)))
    ax_corr.set_xticklabels([str(s) for s in steps], fontsize=8)
    ax_corr.set_xlabel("sampling step")
    _save_atomic(fig, path)


def _save_atomic(fig, path: str | os.PathLike) -> None:
    # A reader (or a crash mid-save) never sees a truncated PNG.
    atomic_write_file(path, lambda f: fig.savefig(f, format="png", dpi=100))


def write_selection_files(out_dir: Path, selection: Any) -> list[Path]:
    """``selection.json``, ``importance.png`` (unless nothing was measured: share_all) and,
    when the selection has a history of checks, ``selection_history.png`` in ``out_dir``
    (each atomically); returns the paths."""

    paths = [atomic_write_text(out_dir / "selection.json", selection.to_json())]
    if not selection.importance:  # share_all: no sampling stage, nothing measured to plot
        return paths
    paths.append(out_dir / "importance.png")
    kept = set(selection.kept)
    plot_importance(paths[1], selection.items, selection.importance, [item in kept for item in selection.items],
                    selection.threshold, title=f"LoRA-drop {selection.granularity} importance (kept by {selection.method})")
    if selection.history:
        paths.append(out_dir / "selection_history.png")
        plot_selection_history(paths[-1], selection.items, selection.history)
    return paths
