"""Selection and sharing plan: hand-worked examples, no DeepSpeed, no process group."""

import math

import pytest
import torch

from loradrop_ds.importance import (
    ImportanceStats,
    Selection,
    SelectionError,
    compute_selection,
    normalise,
    select_top,
    sharing_plan,
)


def stats_from(rows, modules=("q_proj", "v_proj"), tokens=10):
    sums = torch.tensor(rows, dtype=torch.float64)
    return ImportanceStats(list(modules), sums, torch.full_like(sums, float(tokens)))


def test_select_top_hand_worked():
    # importances 0.1, 0.4, 0.2, 0.3: sorted 1 (0.4), 3 (0.7), 2 (0.9) -> reaches 0.9 with three
    assert select_top([1.0, 4.0, 2.0, 3.0], 0.9) == [1, 3, 2]
    # 0.7 is reached exactly by the first two
    assert select_top([1.0, 4.0, 2.0, 3.0], 0.7) == [1, 3]
    # just above 0.7 needs the third
    assert select_top([1.0, 4.0, 2.0, 3.0], 0.7000001) == [1, 3, 2]


def test_ties_break_towards_lower_index():
    assert select_top([2.0, 2.0, 2.0, 2.0], 0.5) == [0, 1]
    assert select_top([1.0, 3.0, 3.0, 1.0], 0.8) == [1, 2, 0]  # 6/8 < .8, tie 0 vs 3 -> 0


def test_threshold_one_keeps_every_nonzero_item():
    assert sorted(select_top([5.0, 0.0, 1e-12, 2.0], 1.0)) == [0, 2, 3]
    assert sorted(select_top([1.0, 1.0, 1.0], 1.0)) == [0, 1, 2]


def test_single_dominant_item():
    assert select_top([1e-9, 1e6, 1e-9, 1e-9], 0.9) == [1]
    assert select_top([1e-9, 1e6, 1e-9, 1e-9], 1.0) == [1, 0, 2, 3]


def test_all_zero_and_bad_statistics_are_clear_errors():
    with pytest.raises(SelectionError, match="all LoRA output statistics are zero"):
        select_top([0.0, 0.0, 0.0], 0.9)
    with pytest.raises(SelectionError, match="not finite"):
        select_top([1.0, math.nan], 0.9)
    with pytest.raises(SelectionError, match="not finite"):
        normalise([1.0, -1.0])
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        select_top([1.0, 2.0], 0.0)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        select_top([1.0, 2.0], 1.5)


def test_layer_granularity_sums_modules():
    # layer sums: 3, 7, 1, 9 (total 20): 9/20=.45, +7 -> .80, +3 -> .95 >= .9
    stats = stats_from([[1.0, 2.0], [3.0, 4.0], [0.5, 0.5], [4.0, 5.0]])
    sel = compute_selection(stats, 0.9, "layer")
    assert sel.items == ["0", "1", "2", "3"]
    assert sel.raw_sums == [3.0, 7.0, 1.0, 9.0]
    assert sel.importance == pytest.approx([0.15, 0.35, 0.05, 0.45])
    assert sel.kept == ["3", "1", "0"]
    assert sel.shared == ["2"]
    assert sel.kept_layers == [0, 1, 3] and sel.shared_layers == [2]
    assert sel.token_count == 10
    plan = sharing_plan(sel)
    assert plan[(2, "q_proj")] is False and plan[(2, "v_proj")] is False
    assert all(plan[(i, m)] for i in (0, 1, 3) for m in ("q_proj", "v_proj"))


def test_module_granularity_selects_pairs():
    # pairs: 0.q=1 0.v=2 1.q=3 1.v=4 2.q=.5 2.v=.5 3.q=4 3.v=5 (total 20)
    # descending: 3.v 5, 1.v 4, 3.q 4 (tie: lower flat index 1.v first), 1.q 3 -> 16/20 = .8; 0.v 2 -> .9
    stats = stats_from([[1.0, 2.0], [3.0, 4.0], [0.5, 0.5], [4.0, 5.0]])
    sel = compute_selection(stats, 0.9, "module")
    assert sel.kept == ["3.v_proj", "1.v_proj", "3.q_proj", "1.q_proj", "0.v_proj"]
    assert sel.shared == ["0.q_proj", "2.q_proj", "2.v_proj"]
    plan = sharing_plan(sel)
    assert plan[(0, "v_proj")] is True and plan[(0, "q_proj")] is False
    assert sel.shared_layers == [0, 2] and sel.kept_layers == [0, 1, 3]


def test_selection_json_round_trip_and_fingerprint():
    sel = compute_selection(stats_from([[1.0, 2.0], [3.0, 4.0]]), 0.5, "layer")
    again = Selection.from_json(sel.to_json())
    assert again == sel
    assert again.fingerprint() == sel.fingerprint()
    other = compute_selection(stats_from([[3.0, 4.0], [1.0, 2.0]]), 0.5, "layer")
    assert other.fingerprint() != sel.fingerprint()


def test_stats_accumulate_and_merge_in_float64():
    a = ImportanceStats.zeros(2, ["q_proj"])
    a.add(1, 0, torch.tensor(2.5, dtype=torch.float32), 3)
    a.add(1, 0, torch.tensor(1.0), torch.tensor(2))
    b = ImportanceStats.zeros(2, ["q_proj"])
    b.add(0, 0, torch.tensor(4.0), 1)
    m = a.merged(b)
    assert m.sq_norm_sums.dtype == torch.float64
    assert m.sq_norm_sums.tolist() == [[4.0], [3.5]]
    assert m.token_counts.tolist() == [[1.0], [5.0]]
