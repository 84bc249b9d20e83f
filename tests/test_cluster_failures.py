"""No rank ever waits for a rank that has failed.

Two ranks are started by two separate launchers (``torchrun --nnodes 2``, one rank each,
on the loopback address), as on two machines: a launcher cannot kill the other's rank,
so a rank that exits while the other waits in a collective would leave it waiting until
the collective timeout. An error on one rank only, at each point where a run checks or
writes something, must end both ranks with exit code 2 and the same one-line message,
long before that timeout (set to 10 minutes here; each test gives the pair 4)."""

import json
import signal
import time

import pytest
from test_train_cli import tiny_args

from conftest import REPO, run_two_nodes, worker_exit_code
from loradrop_ds import preemption
from loradrop_ds import run_checkpoint as ckpt

TRAIN = REPO / "launch" / "train.py"


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert lines, stderr[-3000:]
    return lines[-1]


def worker_traceback(stderr: str) -> bool:
    """A traceback through this project's code (torchrun prints its own for a failed child)."""
    return "Traceback" in stderr and ("launch/train.py\", line" in stderr or "loradrop_ds/" in stderr)


def two_node_run(tiny_model, tmp_path, extra=((), ()), envs=None):
    out = tmp_path / "run"
    args = [tiny_args(tiny_model, out, "dist.timeout_minutes=10", *node_extra) for node_extra in extra]
    return run_two_nodes(TRAIN, args, envs), out


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_data_file_missing_on_one_node_stops_both(tiny_model, tmp_path, failing_rank):
    missing = [f"data.train_file={tmp_path}/only_on_the_other_node.jsonl"]
    extra = [missing, []] if failing_rank == 0 else [[], missing]
    procs, out = two_node_run(tiny_model, tmp_path, extra)
    lines = [error_line(p.stderr) for p in procs]
    assert lines[0] == lines[1], lines
    assert "only_on_the_other_node.jsonl: no such file" in lines[0]
    assert f"[rank {failing_rank} of 2]" in lines[0]
    assert [worker_exit_code(p.stdout + p.stderr) for p in procs] == [2, 2]
    assert not any(worker_traceback(p.stderr) for p in procs)
    assert not (out / "config.yaml").exists()  # nothing was written before every rank's inputs were accepted


def test_a_data_file_that_differs_between_nodes_stops_both(tiny_model, tmp_path):
    """Each node has its own copy of the training file at the same path; node 1's differs
    in one row: the ranks would index different rows."""
    rows = (REPO / "data" / "wordnet_categories" / "train.jsonl").read_text().splitlines()
    copies = []
    for node in range(2):
        path = tmp_path / f"node{node}" / "train.jsonl"
        path.parent.mkdir()
        path.write_text("\n".join(rows if node == 0 else [rows[0].replace("a", "b", 1), *rows[1:]]) + "\n")
        copies.append([f"data.train_file={path}"])
    procs, out = two_node_run(tiny_model, tmp_path, copies)
    lines = [error_line(p.stderr) for p in procs]
    assert lines[0] == lines[1] and "rank 1 sees other data than rank 0" in lines[0], lines
    assert [worker_exit_code(p.stdout + p.stderr) for p in procs] == [2, 2]
    assert not (out / "config.yaml").exists()


def test_an_output_dir_that_is_not_shared_stops_both_before_training(tiny_model, tmp_path):
    """The same output_dir path on two machines that do not share it: here, node 1's path
    simply differs from node 0's."""
    procs, out = two_node_run(tiny_model, tmp_path, [[], [f"output_dir={tmp_path}/node_local"]])
    lines = [error_line(p.stderr) for p in procs]
    assert lines[0] == lines[1], lines
    assert "(rank 1) is not the directory rank 0 writes" in lines[0] and "[rank 1 of 2]" in lines[0]
    assert [worker_exit_code(p.stdout + p.stderr) for p in procs] == [2, 2]
    assert not (out / "config.yaml").exists() and not list(out.glob(".shared-check-*"))  # rank 0 tidied up


@pytest.mark.parametrize("point", ["inputs", "selection", "save"])
@pytest.mark.parametrize("failing_rank", [0, 1])
def test_an_error_on_one_rank_stops_both_with_the_same_message(tiny_model, tmp_path, point, failing_rank):
    envs = [{}, {}]
    envs[failing_rank] = {"LORADROP_TEST_FAIL_AT": point}
    procs, out = two_node_run(tiny_model, tmp_path, envs=envs)
    lines = [error_line(p.stderr) for p in procs]
    assert lines[0] == lines[1] == (f"error: injected failure at {point} (LORADROP_TEST_FAIL_AT) "
                                    f"[rank {failing_rank} of 2]"), lines
    assert [worker_exit_code(p.stdout + p.stderr) for p in procs] == [2, 2]
    assert not any(worker_traceback(p.stderr) for p in procs)
    if point == "save":
        assert (out / "checkpoints" / "main-step0000004").is_dir()  # the last checkpoint is kept
        if failing_rank == 0:  # the writer failed: nothing half-written
            assert not (out / "adapter").exists() and not (out / "summary.json").exists()


def test_an_unexpected_crash_on_one_rank_stops_both(tiny_model, tmp_path):
    procs, _ = two_node_run(tiny_model, tmp_path, envs=[{}, {"LORADROP_TEST_FAIL_AT": "save:crash"}])
    lines = [error_line(p.stderr) for p in procs]
    assert lines[0] == lines[1] == ("error: save failed on rank 1: RuntimeError: injected crash at save "
                                    "(LORADROP_TEST_FAIL_AT)"), lines
    assert [worker_exit_code(p.stdout + p.stderr) for p in procs] == [1, 1]
    assert worker_traceback(procs[1].stderr)  # the crashing rank logs where it crashed


def test_a_rank_that_hangs_fails_the_others_after_the_collective_timeout(tiny_model, tmp_path):
    """dist.timeout_minutes reaches the process group: with rank 1 stuck for 10 minutes,
    rank 0 gives up after 0.1 minutes instead of waiting."""
    out = tmp_path / "run"
    args = [tiny_args(tiny_model, out, "dist.timeout_minutes=0.1")] * 2
    # The stalled rank takes SIGTERM as a stop request (train.preempt_signals) and sleeps on, so
    # ending its launcher afterwards waits torchrun's --shutdown-timeout (30 s by default) before
    # its SIGKILL: 1 s here. It is cleanup only: rank 0 has ended by then.
    procs = run_two_nodes(TRAIN, args, [{}, {"LORADROP_TEST_FAIL_AT": "inputs:stall"}], timeout=120, wait_for=(0,),
                          launcher_args=("--shutdown-timeout=1",))
    assert worker_exit_code(procs[0].stdout + procs[0].stderr) not in (None, 0)
    assert "timed out" in procs[0].stderr.lower() or "timeout" in procs[0].stderr.lower(), procs[0].stderr[-3000:]


def test_a_signal_to_one_nodes_launcher_stops_both_ranks_at_the_same_step(tiny_model, tmp_path):
    """Preemption through torchrun, as launch/slurm_train.sh starts it (``--signals-to-handle``
    with SIGUSR1; torch 2.13's agent re-sends a signal it handles to its workers, then waits
    ``--shutdown-timeout`` before SIGKILL). SIGUSR1 reaches node 1's launcher only, while its
    rank waits after main step 2; node 0's rank is already in step 3's all-reduce. The flag
    rides on that all-reduce, so both ranks checkpoint step 3 and exit with 75. Each launcher
    then exits 1 (torchrun's code for a failed worker and for a signal it handled; it reports
    the worker's 75 in its error report), so rank 0 leaves PREEMPTED.json in output_dir."""
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"

    def signal_node_1_after_main_step_2(launchers):
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and not any(
                '"stage": "main"' in line and '"step": 2,' in line and '"loss"' in line
                for line in (metrics.read_text().splitlines() if metrics.is_file() else [])):
            assert all(p.poll() is None for p in launchers), "a launcher ended before main step 2"
            time.sleep(0.2)
        launchers[1].send_signal(signal.SIGUSR1)

    args = [tiny_args(tiny_model, out, "dist.timeout_minutes=10")] * 2
    procs = run_two_nodes(TRAIN, args, [{}, {"LORADROP_TEST_AWAIT_SIGNAL_AT": "main:2"}],
                          launcher_args=("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                                         "--shutdown-timeout=120"), during=signal_node_1_after_main_step_2)
    logs = [p.stdout + p.stderr for p in procs]
    for node, log in enumerate(logs):
        stop = [line for line in log.splitlines() if line.startswith("preempted: ")]
        assert len(stop) == 1 and "after main step 3; checkpoint " in stop[0], (node, log[-4000:])
        assert ("signals on this rank: SIGUSR1;" if node == 1 else "none (another rank was signalled)") in stop[0]
        assert not worker_traceback(log)
    assert [p.returncode for p in procs] == [1, 1]
    assert worker_exit_code(logs[0]) == preemption.EXIT_CODE == 75
    marker = json.loads((out / preemption.MARKER).read_text())
    assert (marker["stage"], marker["step"], marker["signals"]) == ("main", 3, []), marker  # rank 0 was not signalled
    (newest, state), *_ = ckpt.list_checkpoints(out)
    assert newest.name == "main-step0000003" and (state.stage, state.step) == ("main", 3)
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
