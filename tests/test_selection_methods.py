"""Selection methods, parameter budget and the settling rule: references from the
definitions (autograd's gradients, BA formed explicitly, hand-worked counts), a tiny model
with planted importance, no DeepSpeed engine."""

import itertools
import math
import random
import re

import pytest
import torch

from loradrop_ds import config as config_lib
from loradrop_ds.config import LoraConfig
from loradrop_ds.importance import (
    ImportanceStats,
    ParamCosts,
    SelectionError,
    check_selection_request,
    compute_selection,
    make_plan,
    rank_correlation,
    ranking_settled,
    sampling_settled,
    select_top,
    selection_settled,
    share_all_selection,
    structure_params,
)
from loradrop_ds.lora import ADAPTER, ImportanceRecorder, add_lora, lora_layers, lora_param_scores

MODULES = ["q_proj", "v_proj", "up_proj"]
PLANTED = {1, 3}  # layers whose LoRA A starts 8x larger (tiny model: 4 layers)


def stats_from(rows, modules=("q_proj", "v_proj"), grads=None):
    sums = torch.tensor(rows, dtype=torch.float64)
    g = torch.tensor(grads, dtype=torch.float64) if grads is not None else None
    return ImportanceStats(list(modules), sums, torch.full_like(sums, 10.0), g)


# ----------------------------------------------------------------- ranking and counts

def test_methods_rank_by_their_own_scores_and_keep_output_norms_count():
    # layer sums: 3, 7, 1, 9 -> importances .15 .35 .05 .45; T = 0.75 keeps 2 (9, 7)
    stats = stats_from([[1, 2], [3, 4], [0.5, 0.5], [4, 5]], grads=[[9, 9], [0, 1], [5, 5], [1, 1]])
    param = torch.tensor([[0, 0], [1, 1], [8, 8], [2, 0]], dtype=torch.float64)
    pick = lambda method, **kw: compute_selection(stats, 0.75, "layer", method=method, param_scores=param, **kw)  # noqa: E731
    assert pick("output_norm").kept == ["3", "1"]
    assert pick("bottom").kept == ["2", "0"]
    assert pick("grad_norm").kept == ["0", "2"]  # grad sums 18, 1, 10, 2
    assert pick("param_norm").kept == ["2", "1"]  # 0, 2, 16, 2: the tie of 1 and 3 goes to the lower layer
    assert pick("grad_norm").scores == [18.0, 1.0, 10.0, 2.0]
    assert pick("list", keep=[2]).kept == ["2"]
    assert pick("output_norm", num_kept=3).kept == ["3", "1", "0"]
    for method in ("output_norm", "bottom", "random", "grad_norm", "param_norm"):
        selection = pick(method)
        assert len(selection.kept) == len(select_top(selection.raw_sums, 0.75)) == 2, method
        assert selection.method == method
        assert sorted(selection.kept + selection.shared, key=int) == selection.items


def test_param_norm_ties_break_towards_the_lower_layer():
    stats = stats_from([[1, 1], [1, 1], [1, 1], [1, 1]])
    param = torch.tensor([[0, 0], [1, 1], [0, 0], [2, 0]], dtype=torch.float64)
    assert compute_selection(stats, 0.5, "layer", method="param_norm", param_scores=param).kept == ["1", "3"]


def test_random_is_a_seeded_permutation_that_ignores_the_scores():
    stats = stats_from([[1, 0], [2, 0], [3, 0], [4, 0], [5, 0], [6, 0]])
    shuffled = stats_from([[6, 0], [5, 0], [4, 0], [3, 0], [2, 0], [1, 0]])
    kept = {seed: compute_selection(stats, 0.5, "layer", method="random", seed=seed, num_kept=3).kept
            for seed in range(8)}
    reference = {seed: [str(i) for i in torch.randperm(6, generator=torch.Generator().manual_seed(seed))[:3].tolist()]
                 for seed in range(8)}
    assert kept == reference
    assert len({tuple(sorted(k)) for k in kept.values()}) > 1, "the seed must matter"
    assert compute_selection(shuffled, 0.5, "layer", method="random", seed=3, num_kept=3).kept == kept[3]


def test_module_granularity_methods():
    stats = stats_from([[1, 8], [2, 0.5]], grads=[[0, 1], [3, 0]])
    assert compute_selection(stats, 0.5, "module", method="output_norm").kept == ["0.v_proj"]
    assert compute_selection(stats, 0.5, "module", method="grad_norm").kept == ["1.q_proj"]
    assert compute_selection(stats, 0.5, "module", method="bottom").kept == ["1.v_proj"]
    assert compute_selection(stats, 0.5, "module", method="list", keep=["1.v_proj", "0.q_proj"]).kept == [
        "1.v_proj", "0.q_proj"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "list", "keep": [7]}, "loradrop.keep names ['7'], not layers"),
    ({"method": "list", "keep": [1, 1]}, "lists an item twice"),
    ({"method": "output_norm", "num_kept": 5}, "loradrop.num_kept=5 is not between 1 and the 4 layers"),
    ({"method": "grad_norm"}, "all grad_norm scores are zero"),
])
def test_impossible_requests_are_named(kwargs, message):
    stats = stats_from([[1, 2], [3, 4], [5, 6], [7, 8]])
    with pytest.raises(SelectionError, match=re.escape(message)):
        compute_selection(stats, 0.9, "layer", **kwargs)


# ------------------------------------------------------------------ parameter budget

def costs_for(shapes, r, num_layers, train_shared=True, gain=0):
    return ParamCosts({m: r * (i + o) for m, (i, o) in shapes.items()}, num_layers, train_shared, gain)


def test_structure_params_hand_worked():
    costs = ParamCosts({"q": 100, "v": 60}, num_layers=4, gain_per_use=4)
    # layer granularity, keep layers 0 and 2: 2 x (100 + 60) kept + one shared q and v
    # (160) + 4 gains for each of the 4 shared uses (layers 1 and 3, two modules each)
    plan = make_plan(["0", "2"], 4, ["q", "v"], "layer")
    assert structure_params(plan, costs) == 320 + 160 + 16
    # module granularity: keep every v and q of layer 0 -> one shared q for layers 1-3
    plan = make_plan(["0.q", "0.v", "1.v", "2.v", "3.v"], 4, ["q", "v"], "module")
    assert structure_params(plan, costs) == 100 + 4 * 60 + 100 + 3 * 4
    frozen = ParamCosts({"q": 100, "v": 60}, num_layers=4, train_shared=False)
    assert structure_params(make_plan(["0"], 4, ["q", "v"], "layer"), frozen) == 160


def test_budget_hand_worked():
    # 4 layers of one module costing 100: plain 400, budget 0.5 -> 200. Keeping one layer
    # costs 100 + the shared 100 = 200: fits; two would be 300.
    stats = stats_from([[1.0], [4.0], [2.0], [3.0]], modules=("q",))
    costs = ParamCosts({"q": 100}, num_layers=4)
    selection = compute_selection(stats, 0.9, "layer", param_budget=0.5, costs=costs)
    assert selection.kept == ["1"] and selection.trainable_params == 200
    # with a vector gain of 4 per shared use: 1 kept = 100 + 100 + 3 x 4 = 212 > 200, so none
    gains = ParamCosts({"q": 100}, num_layers=4, gain_per_use=4)
    assert compute_selection(stats, 0.9, "layer", param_budget=0.5, costs=gains).kept == []
    # budget 1.0: everything (item by item the last shared user's gain would overshoot)
    assert len(compute_selection(stats, 0.9, "layer", param_budget=1.0, costs=gains).kept) == 4


def test_budget_never_exceeds_and_is_filled_greedily():
    rng = random.Random(0)
    for trial in range(300):
        modules = ["q", "k", "up"][: rng.randint(1, 3)]
        num_layers = rng.randint(1, 7)
        r = rng.choice([1, 2, 8])
        shapes = {m: (rng.randint(4, 64), rng.randint(4, 64)) for m in modules}
        costs = costs_for(shapes, r, num_layers, train_shared=rng.random() < 0.8, gain=rng.choice([0, 1, r]))
        granularity = rng.choice(["layer", "module"])
        stats = ImportanceStats(modules, torch.rand(num_layers, len(modules), dtype=torch.float64) + 0.01,
                                torch.ones(num_layers, len(modules), dtype=torch.float64))
        budget = rng.uniform(0.05, 1.0)
        plain = structure_params(make_plan([str(i) for i in range(num_layers)], num_layers, modules, "layer"), costs)
        try:
            selection = compute_selection(stats, 0.9, granularity, param_budget=budget, costs=costs,
                                          method=rng.choice(["output_norm", "random", "bottom"]), seed=trial)
        except SelectionError as e:
            floor = structure_params(make_plan([], num_layers, modules, granularity), costs)
            assert floor > math.floor(budget * plain) and "raise param_budget" in str(e)
            continue
        used = structure_params(make_plan(selection.kept, num_layers, modules, granularity), costs)
        assert used == selection.trainable_params <= math.floor(budget * plain), trial


def test_budget_skips_an_item_that_does_not_fit_and_fills_with_smaller_ones():
    # module granularity, q costs 100 and v 10, 2 layers: plain 220, budget 0.7 -> 154.
    # Ranked 0.q, 1.q, 0.v, 1.v: keeping a q costs 100 + the shared q 100 + the shared v 10
    # = 210 (skipped); 0.v: 10 + 100 + 10 = 120; then 1.v: 20 + 100 (no v left to share) = 120.
    stats = stats_from([[9.0, 2.0], [8.0, 1.0]], modules=("q", "v"))
    costs = ParamCosts({"q": 100, "v": 10}, num_layers=2)
    selection = compute_selection(stats, 0.9, "module", param_budget=0.7, costs=costs)
    assert selection.kept == ["0.v", "1.v"] and selection.trainable_params == 120


def test_budget_too_small_is_refused_before_training():
    costs = ParamCosts({"q": 100}, num_layers=4)
    with pytest.raises(SelectionError, match=r"param_budget=0.2 allows 80 .* already needs 100 \(25.0% .* at least 0.25"):
        check_selection_request("output_norm", None, None, 0.2, "layer", 4, ["q"], costs)
    check_selection_request("output_norm", None, None, 0.25, "layer", 4, ["q"], costs)
    with pytest.raises(SelectionError, match="loradrop.keep names"):
        check_selection_request("list", ["0.q"], None, None, "layer", 4, ["q"], costs)


# ------------------------------------------------------------------- settling rule

def test_selection_settled():
    a, b = ["1", "3"], ["3", "1"]
    assert not selection_settled([a, a], patience=2)
    assert not selection_settled([["1"], a, a], patience=2)  # two checks agree, not the two after a third
    assert selection_settled([a, b, a], patience=2)  # order does not matter
    assert not selection_settled([a, ["1"], a, a], patience=3)
    assert selection_settled([["1"], a, a, a, a], patience=3)


def test_rank_correlation_hand_worked():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (0, 1, 2) vs (0, 2, 1): 1 - 6 * 2 / (3 * 8) = 0.5
    assert rank_correlation([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    # ties take average ranks: (0.5, 0.5, 2) vs (0, 1, 2) -> cov 1.5 / sqrt(1.5 * 2)
    assert rank_correlation([5, 5, 9], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3.0))
    assert rank_correlation([0, 0, 0], [1, 2, 3]) is None


def test_ranking_settled_hand_worked():
    # Consecutive checks' scores over 4 items. Ranks (no ties): Spearman = 1 - 6 sum d^2 / (n (n^2 - 1)).
    a = [4.0, 3.0, 2.0, 1.0]  # ranks 3 2 1 0
    b = [8.0, 6.5, 2.5, 0.5]  # the same order: rho 1
    c = [9.0, 6.0, 7.0, 1.0]  # items 1 and 2 swapped: d^2 = 1 + 1, rho = 1 - 12 / 60 = 0.8
    d = [1.0, 9.0, 7.0, 6.0]  # ranks 0 3 2 1 against c's 3 1 2 0: d^2 = 9 + 4 + 0 + 1 = 14, rho = 1 - 84 / 60 = -0.4
    assert rank_correlation(b, c) == pytest.approx(0.8) and rank_correlation(c, d) == pytest.approx(-0.4)
    assert not ranking_settled([a, b], patience=2, min_correlation=0.8)  # 2 checks hold 1 pair, not 2
    assert ranking_settled([a, b, c], patience=2, min_correlation=0.8)  # pairs: 1.0, 0.8
    assert not ranking_settled([a, b, c], patience=2, min_correlation=0.81)
    assert ranking_settled([a, b], patience=1, min_correlation=1.0)
    assert not ranking_settled([a, b, c, d], patience=1, min_correlation=0.0)  # only the last pair counts: -0.4
    assert not ranking_settled([a, [0.0] * 4, a], patience=1, min_correlation=-0.5)  # constant: no correlation


def test_sampling_settled_skips_unrecorded_checks_and_names_its_rules():
    none = {"kept": None, "scores": None}  # a check before any output (B = 0)
    checks = [none, {"kept": ["0"], "scores": [3.0, 2.0, 1.0]}, {"kept": ["0", "1"], "scores": [6.0, 4.0, 1.0]},
              {"kept": ["1", "0"], "scores": [9.0, 7.0, 2.0]}]
    assert sampling_settled(checks, "ranking", 2, 1.0)  # the same order at 3 recorded checks
    assert not sampling_settled(checks, "kept_set", 2, 1.0)  # the kept set changed at the second
    assert sampling_settled(checks, "kept_set", 1, 1.0)
    assert not sampling_settled(checks[:3], "ranking", 2, 1.0)  # the unrecorded check is not one of the 3
    with pytest.raises(ValueError, match="auto_stop must be one of"):
        sampling_settled(checks, "soon", 1, 1.0)


def test_share_all_keeps_nothing_and_counts_each_shared_lora_once():
    costs = ParamCosts({"q": 10, "v": 7}, num_layers=3, gain_per_use=2)
    selection = share_all_selection(3, ["q", "v"], "module", 0.9, costs)
    assert selection.kept == [] and selection.shared == ["0.q", "0.v", "1.q", "1.v", "2.q", "2.v"]
    assert selection.method == "share_all" and selection.importance == [] and selection.kept_layers == []
    assert selection.trainable_params == 10 + 7 + 2 * 6  # each shared LoRA once, a gain per use
    assert selection.shared_layers == [0, 1, 2]
    with pytest.raises(ValueError, match="share_all_selection"):
        compute_selection(stats_from([[1.0, 1.0]]), 0.9, "layer", method="share_all")


@pytest.mark.parametrize(("overrides", "message"), [
    (["loradrop.selection=share_all", "loradrop.num_kept=2"], "share_all keeps no layer"),
    (["loradrop.selection=share_all", "loradrop.warm_start=true"], "no sampling stage to warm-start"),
    (["loradrop.selection=share_all", "loradrop.train_shared=false"], "would train nothing"),
    (["loradrop.num_kept=0"], "set loradrop.selection=share_all"),
    (["loradrop.auto_min_rank_correlation=1.5"], "must be in (-1, 1]"),
    (["loradrop.auto_stop=soon"], "'soon' is not one of"),
    (["loradrop.selection=list"], "needs loradrop.keep"),
    (["loradrop.keep=[1]"], "used only with loradrop.selection=list"),
    (["loradrop.num_kept=2", "loradrop.param_budget=0.5"], "at most one of"),
    (["loradrop.param_budget=1.5"], "must be in (0, 1]"),
    (["loradrop.sampling_steps=auto", "loradrop.auto_max_steps=4"], "cannot hold auto_patience+1=4 checks"),
    (["loradrop.sampling_steps=soon"], "'soon' is not one of: int; 'auto'"),
    (["loradrop.shared_scale=vector", "loradrop.train_shared=false"], "set loradrop.shared_scale=none"),
])
def test_bad_selection_settings_are_named(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.load_config(None, overrides)


# --------------------------------------------- recorder: gradients and parameter norms

def tiny_lora_model(model_dir, dropout=0.0, plant=(), seed=0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = add_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=MODULES), seed)
    with torch.no_grad():
        for (i, _), layer in lora_layers(model, MODULES).items():
            if i in plant:  # A x is 8x larger: so are B's gradient, B itself (SGD), BA and the output
                layer.lora_A[ADAPTER].weight.mul_(8.0)
    return model


def random_batch(vocab, seed, batch=3, seq=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # a padded row: its positions carry no loss
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_recorded_gradient_norms_equal_autograds(tiny_model, checkpointing):
    model = tiny_lora_model(tiny_model)
    layers = lora_layers(model, MODULES)
    with torch.no_grad():  # B = 0 would leave A without gradient
        for layer in layers.values():
            layer.lora_B[ADAPTER].weight.normal_(0.0, 0.1)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    recorder = ImportanceRecorder(model, MODULES, "cpu", record_grads=True)
    reference = torch.zeros(4, len(MODULES), dtype=torch.float64)
    for micro in range(2):  # two micro-batches: the sum of each one's squared gradient norm
        model.zero_grad()
        batch = random_batch(model.config.vocab_size, micro)
        with recorder.recording(batch["attention_mask"]):
            loss = model(**batch).loss
        loss.backward()
        for (i, m), layer in layers.items():
            a, b = layer.lora_A[ADAPTER].weight.grad, layer.lora_B[ADAPTER].weight.grad
            reference[i, MODULES.index(m)] += a.double().pow(2).sum() + b.double().pow(2).sum()
    recorder.remove()
    assert (reference > 0).all()
    torch.testing.assert_close(recorder.stats.grad_sq_sums, reference, rtol=1e-4, atol=0.0)


def test_without_record_grads_nothing_is_recorded(tiny_model):
    model = tiny_lora_model(tiny_model)
    recorder = ImportanceRecorder(model, MODULES, "cpu")
    batch = random_batch(model.config.vocab_size, 0)
    with recorder.recording(batch["attention_mask"]):
        model(**batch).loss.backward()
    assert not recorder.stats.grad_sq_sums.any()


def test_param_scores_are_the_squared_norm_of_scaling_ba(tiny_model):
    model = tiny_lora_model(tiny_model)
    layers = lora_layers(model, MODULES)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B[ADAPTER].weight.normal_()
    scores = lora_param_scores(model, MODULES)
    for (i, m), layer in layers.items():
        delta = 2.0 * layer.lora_B[ADAPTER].weight.double() @ layer.lora_A[ADAPTER].weight.double()  # alpha/r = 2
        assert scores[i, MODULES.index(m)].item() == pytest.approx(delta.pow(2).sum().item(), rel=1e-9)


def test_planted_layers_are_found_by_every_importance_method(tiny_model):
    """Layers 1 and 3 start with an 8x larger A. After a few SGD steps (SGD, so that B grows
    with its gradient: Adam would normalise the step), output norms, gradient norms and
    parameter norms all rank them first; bottom ranks them last."""
    model = tiny_lora_model(tiny_model, plant=PLANTED)
    model.train()
    recorder = ImportanceRecorder(model, MODULES, "cpu", record_grads=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(4):
        optimizer.zero_grad()
        batch = random_batch(model.config.vocab_size, step)
        with recorder.recording(batch["attention_mask"]):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    recorder.remove()
    param = lora_param_scores(model, MODULES)
    planted = sorted(str(i) for i in PLANTED)
    for method in ("output_norm", "grad_norm", "param_norm"):
        selection = compute_selection(recorder.stats, 0.9, "layer", method=method, param_scores=param, num_kept=2)
        assert sorted(selection.kept) == planted, (method, selection.kept)
    bottom = compute_selection(recorder.stats, 0.9, "layer", method="bottom", num_kept=2)
    assert sorted(bottom.kept) == [str(i) for i in range(4) if i not in PLANTED]
    # planted layers dominate: T = 0.9 keeps exactly them
    assert sorted(compute_selection(recorder.stats, 0.9, "layer").kept) == planted
    for m, (i, j) in itertools.product(range(len(MODULES)), [(1, 0), (3, 2)]):
        assert recorder.stats.sq_norm_sums[i, m] > 10 * recorder.stats.sq_norm_sums[j, m]
