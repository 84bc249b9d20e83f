"""Selection methods, the parameter budget and the self-stopping sampling stage through the
real CLI: 2 ranks, ZeRO-3, the tiny model (4 layers; q_proj, v_proj, up_proj; r = 8)."""

import json
import math
import re

import pytest
from safetensors.torch import load_file
from test_resume import assert_same_run

from conftest import REPO, assert_adapter_reproduces_run, finished_run_args, run_ranks, run_ranks_many
from loradrop_ds.importance import select_top

TRAIN = REPO / "launch" / "train.py"
# r * (in + out) for the tiny model (hidden 64, 2 KV heads of 16, intermediate 128)
PER_LAYER = 8 * (64 + 64) + 8 * (64 + 32) + 8 * (64 + 128)
AUTO = ["loradrop.sampling_steps=auto", "loradrop.auto_check_every=1", "loradrop.auto_patience=2",
        "loradrop.auto_max_steps=12", "train.keep_last=10"]
# The ranking stop: 2 consecutive pairs of checks with Spearman >= 0.8 (4 layers: at most one
# neighbouring swap), then the budget applies to the last check's ranking.
AUTO_RANKING = [*AUTO, "loradrop.auto_stop=ranking", "loradrop.auto_min_rank_correlation=0.8",
                "loradrop.param_budget=0.5"]


def read(out, name):
    return json.loads((out / name).read_text())


RUNS = {"auto": AUTO, "auto_ranking": AUTO_RANKING, "param_budget": ["loradrop.param_budget=0.5"],
        "share_all": ["loradrop.selection=share_all"],
        "share_all_scalar": ["loradrop.selection=share_all", "loradrop.shared_scale=scalar"],
        "param_norm": ["loradrop.selection=param_norm", "train.keep_last=10"],
        "grad_norm": ["loradrop.selection=grad_norm", "train.keep_last=10"]}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict:
    """The module's finished runs, by name, trained one after another in one set of rank
    processes (``run_ranks_many``); and "killed_ranking": the "auto_ranking" run killed after
    sampling step 3 in processes of its own (SIGKILL), its exit code, and its resume, the last
    run of that set (output_dir, exit code of the kill, the resume's result)."""
    root = tmp_path_factory.mktemp("selection_cli")
    outs = {name: root / name / "run" for name in RUNS}
    killed = root / "killed_ranking" / "run"
    kill = run_ranks(TRAIN, finished_run_args(tiny_model, killed, *AUTO_RANKING), check=False,
                     extra_env={"LORADROP_TEST_SIGKILL_AT": "sampling:3"})
    procs = run_ranks_many([finished_run_args(tiny_model, outs[name], *extra) for name, extra in RUNS.items()]
                           + [finished_run_args(tiny_model, killed, *AUTO_RANKING)], root / "logs", check=False)
    for name, proc in zip(RUNS, procs, strict=False):
        assert proc.returncode == 0, (name, proc.stderr[-4000:])
    return {**outs, "killed_ranking": (killed, kill.returncode, procs[-1])}


@pytest.fixture(scope="module")
def auto_run(runs):
    return runs["auto"]


def test_auto_sampling_stops_at_the_first_settled_check(auto_run):
    selection, summary = read(auto_run, "selection.json"), read(auto_run, "summary.json")
    steps, history = summary["sampling"]["steps"], selection["history"]
    assert summary["sampling"]["settled"] and steps < 12
    assert [h["step"] for h in history] == list(range(1, steps + 1))  # a check after every step
    assert history[0]["kept"] is None  # the first step records zeros (B starts at 0)
    # Written out from the rule: stop at the first check whose kept set equals the two before it.
    kept = [(h["step"], sorted(h["kept"])) for h in history if h["kept"] is not None]
    first = next(step for i, (step, k) in enumerate(kept) if i >= 2 and kept[i - 1][1] == k == kept[i - 2][1])
    assert first == steps and sorted(selection["kept"]) == kept[-1][1]
    assert history[-1]["rank_correlation"] == pytest.approx(1.0)
    # Each check's scores are kept (to replay other stopping rules); the last check is the final selection's.
    assert all(len(h["scores"]) == len(selection["items"]) for h in history[1:])
    assert history[-1]["scores"] == pytest.approx(selection["raw_sums"])
    assert history[1]["scores"] != history[-1]["scores"]
    assert (auto_run / "selection_history.png").stat().st_size > 0
    # Every rank stopped at that step: each wrote its part of the stage's last checkpoint there.
    last = auto_run / "checkpoints" / f"sampling-step{steps:07d}"
    assert sorted(p.name for p in (last / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]


def spearman(a, b):
    """From the definition for distinct values: 1 - 6 sum d^2 / (n (n^2 - 1)) over the ranks."""
    def ranks(v):
        return {i: r for r, i in enumerate(sorted(range(len(v)), key=lambda i: v[i]))}

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1.0 - 6.0 * sum((ra[i] - rb[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def test_ranking_stop_ends_the_stage_when_consecutive_rankings_agree(runs):
    out = runs["auto_ranking"]
    selection, summary = read(out, "selection.json"), read(out, "summary.json")
    steps, history = summary["sampling"]["steps"], selection["history"]
    assert summary["sampling"]["settled"] and steps < 12
    scored = [(h["step"], h["scores"]) for h in history if h["scores"] is not None]
    assert all(len(set(scores)) == 4 for _, scores in scored)  # distinct: the formula above applies
    rho = [spearman(a, b) for (_, a), (_, b) in zip(scored, scored[1:], strict=False)]
    # Written out from the rule: the first check whose two pairs with the checks before it reach 0.8.
    first = next(scored[i + 1][0] for i in range(1, len(rho)) if rho[i - 1] >= 0.8 and rho[i] >= 0.8)
    assert first == steps == history[-1]["step"]
    # The budget applies to the last check's ranking: the most important layer, and the shared LoRA.
    assert selection["kept"] == [str(max(range(4), key=lambda i: scored[-1][1][i]))]
    assert summary["trainable_params"] == 2 * PER_LAYER
    last = out / "checkpoints" / f"sampling-step{steps:07d}"  # every rank stopped there
    assert sorted(p.name for p in (last / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]


def test_ranking_stop_resumes_exactly_after_a_kill(runs):
    """The stopping rule reads the checks' history, which checkpoints carry in the run's
    results; the kept-set rule reads the same history (its decision is tested above)."""
    reference = runs["auto_ranking"]
    steps = read(reference, "summary.json")["sampling"]["steps"]
    assert steps >= 4, "the kill below must land before the stage settles"
    out, kill_code, proc = runs["killed_ranking"]
    assert kill_code != 0, "the run was meant to be killed"
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "sampling-step0000002" in proc.stderr  # resumed mid-stage, history from the checkpoint
    assert_same_run(out, reference)
    assert read(out, "selection.json")["history"] == read(reference, "selection.json")["history"]


@pytest.mark.parametrize(("name", "gains"), [("share_all", 0), ("share_all_scalar", 1)])
def test_share_all_trains_one_lora_per_module_and_reloads_in_peft(tiny_model, runs, name, gains):
    out = runs[name]
    selection, summary = read(out, "selection.json"), read(out, "summary.json")
    # One LoRA per module type, r * (in + out) each, used by all 4 layers; a scalar gain per use (4 x 3).
    assert summary["trainable_params"] == selection["trainable_params"] == PER_LAYER + gains * 4 * 3
    assert selection["method"] == "share_all" and selection["kept"] == [] and selection["shared_layers"] == [0, 1, 2, 3]
    assert "sampling" not in summary and not (out / "importance.png").exists()  # no sampling stage ran
    assert not any(p.name.startswith("sampling-") for p in (out / "checkpoints").iterdir())
    assert_adapter_reproduces_run(tiny_model, out)


def test_param_budget_trains_exactly_what_it_counted(runs):
    out = runs["param_budget"]
    selection, summary = read(out, "selection.json"), read(out, "summary.json")
    # plain 4 x PER_LAYER; half of it holds one kept layer and the shared LoRA, not two kept layers
    assert summary["plain_lora_params"] == 4 * PER_LAYER
    assert len(selection["kept"]) == 1 and selection["param_budget"] == 0.5
    assert summary["trainable_params"] == selection["trainable_params"] == 2 * PER_LAYER
    assert summary["trainable_params"] <= math.floor(0.5 * summary["plain_lora_params"])
    # the kept layer is the most important one
    assert selection["kept"] == [str(max(range(4), key=lambda i: selection["raw_sums"][i]))]


@pytest.mark.parametrize("method", ["param_norm", "grad_norm"])
def test_baselines_rank_by_their_scores_and_keep_output_norms_count(runs, method):
    out = runs[method]
    selection = read(out, "selection.json")
    scores = selection["scores"]
    assert selection["method"] == method and all(math.isfinite(s) and s > 0 for s in scores)
    count = len(select_top(selection["raw_sums"], 0.6))
    assert selection["kept"] == [str(i) for i in sorted(range(4), key=lambda i: (-scores[i], i))[:count]]
    if method == "param_norm":
        # From the definition, on the sampling stage's last adapter (gathered from the shards
        # into the checkpoint): sum over the layer's modules of ||(alpha / r) B A||_F^2.
        weights = load_file(out / "checkpoints" / "sampling-step0000004" / "adapter" / "adapter_model.safetensors")
        want = [0.0] * 4
        for key, a in weights.items():
            if "lora_A" in key:
                b = weights[key.replace("lora_A", "lora_B")].double()
                layer = int(re.search(r"\.layers\.(\d+)\.", key).group(1))
                want[layer] += (2.0 * b @ a.double()).pow(2).sum().item()
        assert scores == pytest.approx(want, rel=1e-6)
