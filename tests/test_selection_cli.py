"""Selection methods, the parameter budget and the self-stopping sampling stage through the
real CLI: 2 ranks, ZeRO-3, the tiny model (4 layers; q_proj, v_proj, up_proj; r = 8)."""

import json
import math
import re

import pytest
from safetensors.torch import load_file
from test_resume import assert_same_run

from conftest import REPO, finished_run_args, run_ranks, run_ranks_many
from loradrop_ds.importance import select_top

TRAIN = REPO / "launch" / "train.py"
# r * (in + out) for the tiny model (hidden 64, 2 KV heads of 16, intermediate 128)
PER_LAYER = 8 * (64 + 64) + 8 * (64 + 32) + 8 * (64 + 128)
AUTO = ["loradrop.sampling_steps=auto", "loradrop.auto_check_every=1", "loradrop.auto_patience=2",
        "loradrop.auto_max_steps=12", "train.keep_last=10"]


def read(out, name):
    return json.loads((out / name).read_text())


RUNS = {"auto": AUTO, "param_budget": ["loradrop.param_budget=0.5"],
        "param_norm": ["loradrop.selection=param_norm", "train.keep_last=10"],
        "grad_norm": ["loradrop.selection=grad_norm", "train.keep_last=10"]}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict:
    """The module's finished runs, by name, trained one after another in one set of rank
    processes (``run_ranks_many``); and "killed_auto": the "auto" run killed after sampling
    step 3 in processes of its own (SIGKILL), its exit code, and its resume, the last run of
    that set (output_dir, exit code of the kill, the resume's result)."""
    root = tmp_path_factory.mktemp("selection_cli")
    outs = {name: root / name / "run" for name in RUNS}
    killed = root / "killed_auto" / "run"
    kill = run_ranks(TRAIN, finished_run_args(tiny_model, killed, *AUTO), check=False,
                     extra_env={"LORADROP_TEST_SIGKILL_AT": "sampling:3"})
    procs = run_ranks_many([finished_run_args(tiny_model, outs[name], *extra) for name, extra in RUNS.items()]
                           + [finished_run_args(tiny_model, killed, *AUTO)], root / "logs", check=False)
    for name, proc in zip(RUNS, procs, strict=False):
        assert proc.returncode == 0, (name, proc.stderr[-4000:])
    return {**outs, "killed_auto": (killed, kill.returncode, procs[-1])}


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


def test_auto_sampling_resumes_exactly_after_a_kill(runs, auto_run):
    steps = read(auto_run, "summary.json")["sampling"]["steps"]
    assert steps >= 4, "the kill below must land before the stage settles"
    out, kill_code, proc = runs["killed_auto"]
    assert kill_code != 0, "the run was meant to be killed"
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "sampling-step0000002" in proc.stderr  # resumed mid-stage, history from the checkpoint
    assert_same_run(out, auto_run)
    assert read(out, "selection.json")["history"] == read(auto_run, "selection.json")["history"]


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
