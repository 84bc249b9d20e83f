"""A finished run is never trained over: resume=auto refuses an output_dir holding a
finished run or a run without a complete checkpoint (exit 2, nothing changed), unless
overwrite=true, which moves the earlier run aside only after every input check passed."""

import shutil

import pytest

from conftest import REPO, finished_run_args, run_python, run_ranks
from loradrop_ds import run_checkpoint as ckpt

TRAIN = REPO / "launch" / "train.py"


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_leftovers_without_a_checkpoint_are_refused_unchanged(tiny_model, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 1\n")
    (run / "metrics.jsonl").write_text('{"stage": "sampling", "step": 1, "loss": 2.0}\n')
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".tmp-sampling-step0000002").mkdir()  # an interrupted write: no checkpoint
    before = snapshot(run)
    proc = run_python([str(TRAIN), *finished_run_args(tiny_model, run)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds files of an earlier run" in proc.stderr and "no complete checkpoint" in proc.stderr
    assert "overwrite=true" in proc.stderr and "new output_dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(run) == before


def test_overwrite_with_a_checkpoint_path_is_refused(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="cannot be combined with resume="):
        ckpt.find_resume_checkpoint(str(tmp_path / "x"), tmp_path, overwrite=True)
    assert ckpt.find_resume_checkpoint("auto", tmp_path, overwrite=True) is None


def test_overwrite_moves_a_finished_run_aside_and_trains_afresh(tiny_model, finished_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    # A bad input with overwrite=true: refused before anything is moved.
    proc = run_python([str(TRAIN), *finished_run_args(tiny_model, run, "overwrite=true",
                                                       f"data.train_file={tmp_path}/missing.jsonl")])
    assert proc.returncode == 2 and snapshot(run) == before, proc.stderr[-2000:]
    proc = run_ranks(TRAIN, finished_run_args(tiny_model, run, "overwrite=true", "train.max_steps=2",
                                              "loradrop.sampling_steps=2"))
    assert "resuming from" not in proc.stdout + proc.stderr
    aside = list(run.glob("overwritten-*"))
    assert len(aside) == 1 and snapshot(aside[0]) == before  # the earlier run, byte for byte
    assert (run / "summary.json").is_file() and (run / "adapter").is_dir()
    assert [p.name for p, _ in ckpt.list_checkpoints(run)][0] == "main-step0000002"  # the new run's


def test_overwrite_still_resumes_an_unfinished_run(finished_run, tmp_path):
    """overwrite=true replaces only what resume=auto would refuse: a requeued job whose run
    is unfinished (a complete checkpoint, no summary.json or adapter/) keeps its progress."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    assert ckpt.find_resume_checkpoint("auto", out, overwrite=True) is None  # finished: start afresh
    (out / "summary.json").unlink()
    shutil.rmtree(out / "adapter")
    found = ckpt.find_resume_checkpoint("auto", out, overwrite=True)
    assert found is not None and found[0] == ckpt.list_checkpoints(out)[0][0]
