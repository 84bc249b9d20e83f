"""A full disk loses nothing (issue 19): a write that fails for lack of space, at each place
a run writes (one rank's checkpoint files, the manifest, the final adapter, summary.json)
or in an export, is one line and exit code 2 on every rank; the previous complete
checkpoint stays and resume=auto continues from it to the uninterrupted run's result; no
partial directory is left or taken for a checkpoint.

The sites are hit by an injected ``OSError(ENOSPC)`` (``LORADROP_TEST_FAIL_AT=POINT:enospc``,
``loradrop_ds.faults``); where this machine lets us mount a tmpfs (root), a real full file
system is also used, which the checkpoint's own writes hit first."""

import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from test_resume import assert_same_run

from conftest import REPO, finished_run_args, run_ranks_many
from loradrop_ds import run_checkpoint as ckpt
from loradrop_ds.disk_full import DiskFullError, disk_full_reported, is_disk_full

NO_SPACE = "no space left on device writing "

# One output directory, one run after another (run_ranks_many); each fails at the next write site,
# and the next run resumes: (injection, what the error line names, the checkpoint it says is left).
CHAIN = [
    # Rank 1 only, as it starts writing its own files of main-step0000004.
    ({"LORADROP_TEST_FAIL_AT": "rank-files:main-step0000004:enospc", "LORADROP_TEST_FAIL_RANK": "1"},
     "checkpoints/.tmp-main-step0000004/rng/rank1.pt", "main-step0000002"),
    # Rank 0's manifest of main-step0000006, every file already written.
    ({"LORADROP_TEST_FAIL_AT": "marker:main-step0000006:enospc"},
     "checkpoints/.tmp-main-step0000006/COMPLETE.json", "main-step0000004"),
    # The final adapter, after the last step's checkpoint.
    ({"LORADROP_TEST_FAIL_AT": "adapter:enospc"}, "adapter", "main-step0000006"),
    # summary.json, with the adapter and the probe logits already written.
    ({"LORADROP_TEST_FAIL_AT": "summary:enospc"}, "summary.json", "main-step0000006"),
    ({}, None, None),
]


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def real_full_disk(finished_run, tmp_path_factory):
    """A tmpfs with room for a run's small files, the sampling stage's two checkpoints and one
    main-stage one, not two more (sized from ``finished_run``): its mount point, and None or
    why this machine cannot mount one."""
    one = sum(f.stat().st_size for f in (finished_run / "checkpoints" / "main-step0000002").rglob("*") if f.is_file())
    small = sum(f.stat().st_size for f in finished_run.iterdir() if f.is_file())
    where = tmp_path_factory.mktemp("real_full_disk") / "tmpfs"
    why = _mount_tmpfs(where, f"{int(small + 3.6 * one) // 1024 + 64}k")
    yield where, why
    if why is None:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="module")
def full_disk_chain(tiny_model, tmp_path_factory, real_full_disk):
    """The CHAIN's runs in one output directory; then, where a tmpfs could be mounted, one run
    on that real full file system (``train.keep_last=5``): all in one set of rank processes
    (run_ranks_many). Returns the logs' parent, the chain's output_dir, the chain's results
    and the real-disk run's (output_dir, result, index of its logs) or None."""
    tmp = tmp_path_factory.mktemp("disk_full")
    out = tmp / "run"
    runs = [finished_run_args(tiny_model, out) for _ in CHAIN]
    envs = [env for env, _, _ in CHAIN]
    disk, why = real_full_disk
    if why is None:
        runs.append(finished_run_args(tiny_model, disk / "run", "train.keep_last=5"))
        envs.append({})
    procs = run_ranks_many(runs, tmp / "logs", check=False, envs=envs)
    real = (disk / "run", procs[len(CHAIN)], len(CHAIN)) if why is None else None
    return tmp, out, procs[:len(CHAIN)], real


def test_a_full_disk_at_each_write_site_stops_every_rank_and_resume_continues(full_disk_chain, finished_run):
    tmp, out, procs, _ = full_disk_chain
    for i, ((env, path, left), proc) in enumerate(zip(CHAIN, procs, strict=True)):
        if path is None:
            assert proc.returncode == 0, proc.stderr[-4000:]
            continue
        assert proc.returncode == 2, (env, proc.stderr[-4000:])  # on both ranks (run_ranks_many checks they agree)
        for rank in (0, 1):
            log = (tmp / "logs" / f"run{i}.rank{rank}").read_text()
            lines = error_lines(log)
            assert len(lines) == 1 and "Traceback" not in log, (env, rank, log[-3000:])
            assert lines[0].startswith(f"error: {NO_SPACE}{out / path}: free space or point output_dir elsewhere; "
                                       f"the last complete checkpoint {left} is intact and resume=auto continues "
                                       "from it"), (env, rank, lines[0])
        # The next run took that checkpoint (its manifest verified: list_checkpoints) and went on.
        following = procs[i + 1].stderr
        assert "resuming from" in following and left in following.split("resuming from", 1)[1].splitlines()[0], \
            (env, following[-3000:])
    # No partial directory is left, and the chain ends as the uninterrupted run.
    assert not list((out / "checkpoints").glob(".tmp-*")) and not list(out.glob(".*.tmp*"))
    assert [p.name for p, _ in ckpt.list_checkpoints(out)] == ["main-step0000006", "main-step0000004",
                                                              "main-step0000002"]
    assert_same_run(out, finished_run)


# ------------------------------------------------------------------ a real full file system


def _mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``where``; None, or why it cannot be done here."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        return "no mount command"
    return None if proc.returncode == 0 else f"mount -t tmpfs refused ({proc.stderr.strip()}): needs root"


@pytest.fixture
def small_disk(tmp_path):
    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        why = _mount_tmpfs(where, size)
        if why:
            pytest.skip(f"a real full file system needs a tmpfs mount: {why}; the injected ENOSPC tests cover the sites")
        mounted.append(where)
        return where

    mounted: list[Path] = []
    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_torch_save_on_a_full_disk_is_recognised(small_disk):
    """torch.save says nothing of ENOSPC ("unexpected pos"): the free space after it tells."""
    disk = small_disk("256k")
    target = disk / "big.pt"
    with pytest.raises(DiskFullError, match=f"{NO_SPACE}{disk}: free space"):
        with disk_full_reported(disk, lambda: "free space"):
            torch.save({"a": torch.zeros(1 << 18)}, target)
    assert is_disk_full(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), disk)
    assert not is_disk_full(RuntimeError("unrelated"), REPO)  # plenty of space there


def test_a_real_full_disk_during_a_checkpoint_leaves_the_previous_one(full_disk_chain, real_full_disk):
    """A 2-rank run on a tmpfs with room for its first checkpoints only (``real_full_disk``):
    rank 0's optimizer state (or whichever write comes first) fails, every rank stops with the
    one line, and the newest complete checkpoint is what resume=auto takes."""
    if real_full_disk[1] is not None:
        pytest.skip(f"a real full file system needs a tmpfs mount: {real_full_disk[1]}; the injected ENOSPC tests "
                    "cover the sites")
    tmp, _, _, (out, proc, index) = full_disk_chain
    assert proc.returncode == 2, proc.stderr[-4000:]  # on both ranks (run_ranks_many checks that they agree)
    for rank in (0, 1):
        log = (tmp / "logs" / f"run{index}.rank{rank}").read_text()
        lines = error_lines(log)
        assert len(lines) == 1 and lines[0].startswith(f"error: {NO_SPACE}{out}"), (rank, lines)
        assert "loradrop_ds/" not in log and 'train.py", line' not in log, log[-4000:]  # no traceback of ours
    lines = error_lines(proc.stderr)
    found = ckpt.list_checkpoints(out, warn=False)
    assert found and found[0][0].name in lines[0] and "resume=auto continues from it" in lines[0], (lines, found)
    assert ckpt.find_resume_checkpoint("auto", out)[0] == found[0][0]
    assert not list((out / "checkpoints").glob(".tmp-*")) and not (out / "adapter").exists()
    # Nothing already written is lost: every complete checkpoint verifies (list_checkpoints), and the
    # metrics up to the newest one are there.
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) >= found[0][1].step


# --------------------------------------------------------------------------------- export


def test_an_export_on_a_full_disk_leaves_nothing(finished_run, tmp_path, monkeypatch):
    """The export's last file (README.md) fails with ENOSPC: the error says so, and neither
    --out nor the directories made above it remain."""
    from loradrop_ds.export import ExportError, export

    write_text = Path.write_text

    def full_disk(self, *a, **k):
        if self.name == "README.md":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full_disk)
    out = tmp_path / "new" / "export"
    with pytest.raises(ExportError, match=f"{NO_SPACE}.*README.md: free space or choose another --out; nothing "
                                          f"was written to {out}"):
        export(finished_run, out, "peft")
    assert not (tmp_path / "new").exists()
    assert shutil.disk_usage(tmp_path)  # the source is untouched: it exports afterwards
    monkeypatch.undo()
    assert (export(finished_run, out, "peft") / "adapter_model.safetensors").is_file()
