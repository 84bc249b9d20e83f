"""Resume on another number of ranks, fp32, no dropout: a run killed with SIGKILL on 2
ranks resumes on 1 and vice versa, from its rank-independent ``full_state.pt``, and ends
as the uninterrupted run with the same global batch (micro_batch_size 4 x grad_accum 1 x
2 ranks = 4 x 2 x 1 rank = 8 items per optimizer step).

Tolerance: 1e-5 relative on every step's loss and on the final adapter. Gradients are
reduced in another order (2 ranks: an all-reduce of two micro-batch means; 1 rank: two
accumulated micro-batches), so the runs agree to rounding, not bit for bit."""

import shutil

import pytest
from test_resume import assert_same_run

from conftest import REPO, finished_run_args, run_python, run_ranks
from loradrop_ds import run_checkpoint as ckpt

TRAIN = REPO / "launch" / "train.py"
RTOL = 1e-5
# The global batch stays 8 items: grad_accum changes with the number of ranks.
ACCUM = {2: "train.grad_accum=1", 1: "train.grad_accum=2"}


def args(model, out, ranks, *extra):
    return finished_run_args(model, out, "lora.dropout=0.0", ACCUM[ranks], *extra)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    """The same run, uninterrupted, on 2 ranks and on 1 (same global batch)."""
    root = tmp_path_factory.mktemp("ws_ref")
    refs = {}
    for ranks in (2, 1):
        refs[ranks] = root / f"ranks{ranks}"
        run_ranks(TRAIN, args(tiny_model, refs[ranks], ranks), nproc=ranks)
    return refs


def test_same_global_batch_gives_the_same_run_on_1_and_2_ranks(uninterrupted):
    assert_same_run(uninterrupted[1], uninterrupted[2], RTOL)


@pytest.mark.parametrize(("before", "after", "kill_at", "resumed_from"), [
    (2, 1, "main:5", "main-step0000004"),
    (2, 1, "sampling:3", "sampling-step0000002"),
    (1, 2, "main:5", "main-step0000004"),
    (1, 2, "sampling:3", "sampling-step0000002"),
])
def test_killed_run_resumes_on_another_number_of_ranks(tiny_model, tmp_path, uninterrupted, before, after, kill_at,
                                                       resumed_from):
    out = tmp_path / "run"
    proc = run_ranks(TRAIN, args(tiny_model, out, before), nproc=before, check=False,
                     extra_env={"LORADROP_TEST_SIGKILL_AT": kill_at})
    assert proc.returncode != 0, "the run was meant to be killed"
    path, state = ckpt.find_resume_checkpoint("auto", out)
    assert path.name == resumed_from and state.world_size == before and (path / ckpt.FULL_STATE).is_file()
    proc = run_ranks(TRAIN, args(tiny_model, out, after), nproc=after)
    log = proc.stdout + proc.stderr
    assert "resuming from" in log and resumed_from in log
    assert f"resumed on {after} ranks from a checkpoint of {before}" in log
    assert_same_run(out, uninterrupted[after], RTOL)


def test_another_global_batch_on_another_world_size_is_refused_as_a_settings_change(tiny_model, tmp_path,
                                                                                      uninterrupted):
    """grad_accum may change with the number of ranks only if the global batch stays."""
    run = tmp_path / "copy"
    shutil.copytree(uninterrupted[2], run)
    for name in ("summary.json", "adapter"):  # as if killed after its last checkpoint
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    proc = run_python([str(TRAIN), *args(tiny_model, run, 1, "train.grad_accum=3")])  # 1 rank, no launcher
    assert proc.returncode == 2 and "train.grad_accum: checkpoint 1, now 3" in proc.stderr, proc.stderr[-2000:]


def test_map_stream_position():
    # 100 items; 2 ranks x 4 (groups of 8, 12 per epoch) -> 1 rank x 4 (groups of 4, 25 per epoch)
    assert ckpt.map_stream_position(4, 100, 8, 4) == 8  # 32 items into epoch 0
    assert ckpt.map_stream_position(12 + 3, 100, 8, 4) == 25 + 6  # epoch 1, 24 items in
    assert ckpt.map_stream_position(8, 100, 4, 8) == 4
    assert ckpt.map_stream_position(3, 100, 4, 8) == 2  # 12 items: rounded up to a whole new micro-batch
    # 15 items, groups of 1 -> groups of 8 (one per epoch): 14 items in is still epoch 0's only
    # micro-batch boundary, not a jump into epoch 1.
    assert ckpt.map_stream_position(14, 15, 1, 8) == 1
