"""Resume on another number of ranks, fp32, no dropout: a run killed with SIGKILL on 2
ranks resumes on 1 and vice versa, from its rank-independent training state, and ends
as the uninterrupted run with the same global batch (micro_batch_size 4 x grad_accum 1 x
2 ranks = 4 x 2 x 1 rank = 8 items per optimizer step). One case resumes into 2 ranks
with the LoRA parameters resident (ds_configs/zero3.json), one from a checkpoint of the
older format (``full_state.pt``).

Tolerance: 1e-5 relative on every step's loss and on the final adapter. Gradients are
reduced in another order (2 ranks: an all-reduce of two micro-batch means; 1 rank: two
accumulated micro-batches), so the runs agree to rounding, not bit for bit.

The uninterrupted runs keep every checkpoint (``train.keep_last=10``, a setting a resume may
change), so their checkpoints of both stages on 1 and 2 ranks are compared file by file:
no file grows with the number of ranks, the optimizer state is stored once, and the
planner's checkpoint bytes (``planner.checkpoint_bytes``) match them."""

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_resume import assert_same_run

from conftest import REPO, finished_run_args, run_python, run_ranks, run_ranks_many
from loradrop_ds import run_checkpoint as ckpt
from loradrop_ds import training_state
from loradrop_ds.planner.checkpoint_bytes import checkpoint_bytes

TRAIN = REPO / "launch" / "train.py"
RTOL = 1e-5
# The global batch stays 8 items: grad_accum changes with the number of ranks.
ACCUM = {2: "train.grad_accum=1", 1: "train.grad_accum=2"}


def args(model, out, ranks, *extra):
    return finished_run_args(model, out, "lora.dropout=0.0", ACCUM[ranks], "train.keep_last=10", *extra)


def test_same_global_batch_gives_the_same_run_on_1_and_2_ranks(uninterrupted):
    assert_same_run(uninterrupted[1], uninterrupted[2], RTOL)


def to_older_format(path):
    """Rewrite checkpoint ``path`` in the format checkpoints had before the optimizer state was
    stored once (what ``run_checkpoint.gather_full_state`` wrote, beside DeepSpeed's ``ds/``):
    ``full_state.pt``, one ``torch.save`` dict of every trainable parameter's full tensors,
    shaped, under ``params[name]["fp32" | "exp_avg" | "exp_avg_sq"]``, with ``optimizer_step``,
    one ``lrs`` entry per param group, ``lr_scheduler``, ``global_steps`` and ``global_samples``."""
    flat = load_file(path / training_state.TENSORS)
    scalars = json.loads((path / training_state.SCALARS).read_text())
    params = {name: {kind: flat[f"{kind}/{name}"].reshape(shape) for kind in ("fp32", "exp_avg", "exp_avg_sq")}
              for name, shape in scalars["shapes"].items()}
    torch.save({"params": params, "optimizer_step": scalars["optimizer_step"],
                "lrs": [g["lr"] for g in scalars["param_groups"]], "lr_scheduler": scalars["lr_scheduler"],
                "global_steps": scalars["global_steps"], "global_samples": scalars["global_samples"]},
               path / ckpt.FULL_STATE)
    for name in (training_state.TENSORS, training_state.SCALARS):
        (path / name).unlink()
    manifest = json.loads((path / ckpt.MARKER).read_text())
    files = {k: v for k, v in manifest["files"].items() if k not in (training_state.TENSORS, training_state.SCALARS)}
    manifest["files"] = {**files, ckpt.FULL_STATE: (path / ckpt.FULL_STATE).stat().st_size}
    (path / ckpt.MARKER).write_text(json.dumps(manifest))


# (ranks before, ranks after, kill point, the checkpoint resumed from, variant)
KILLED = [
    (2, 1, "main:5", "main-step0000004", None),
    (2, 1, "sampling:3", "sampling-step0000002", None),
    (1, 2, "main:5", "main-step0000004", "resident"),  # LoRA resident on each rank (ds_configs/zero3.json)
    (1, 2, "sampling:3", "sampling-step0000002", "older format"),
]


@pytest.fixture(scope="module")
def ws_runs(tiny_model, tmp_path_factory) -> dict:
    """Each KILLED run killed on its first number of ranks, in processes of its own (SIGKILL);
    what its newest checkpoint was then (and, for "older format", that checkpoint rewritten in
    the older format). Then per number of ranks, in one set of rank processes (run_ranks_many):
    the uninterrupted run (same global batch) and the killed runs resumed on that number."""
    root = tmp_path_factory.mktemp("ws")
    refs = {ranks: root / f"ranks{ranks}" for ranks in (2, 1)}
    killed, resumes = [], {1: [], 2: []}
    for i, (before, after, kill_at, _, variant) in enumerate(KILLED):
        out = root / f"killed{i}"
        extra = ["deepspeed=ds_configs/zero3.json"] if variant == "resident" else []
        proc = run_ranks(TRAIN, args(tiny_model, out, before, *extra), nproc=before, check=False,
                         extra_env={"LORADROP_TEST_SIGKILL_AT": kill_at})
        seen = {"out": out, "returncode": proc.returncode}
        found = ckpt.find_resume_checkpoint("auto", out)
        if found is not None:
            path, state = found
            seen.update(name=path.name, world_size=state.world_size, format=training_state.checkpoint_format(path),
                        full_state=(path / ckpt.FULL_STATE).exists())
            if variant == "older format":
                to_older_format(path)
                seen.update(older_format=training_state.checkpoint_format(path), verified=ckpt.verify_checkpoint(path))
        killed.append(seen)
        resumes[after].append((i, args(tiny_model, out, after, *extra)))
    resumed = {}
    for ranks, runs in resumes.items():
        procs = run_ranks_many([args(tiny_model, refs[ranks], ranks), *(argv for _, argv in runs)],
                               root / f"logs{ranks}", nproc=ranks, check=False)
        assert procs[0].returncode == 0, procs[0].stderr[-4000:]  # the uninterrupted run
        resumed.update({i: proc for (i, _), proc in zip(runs, procs[1:], strict=True)})
    return {"refs": refs, "killed": killed, "resumed": resumed}


@pytest.fixture(scope="module")
def uninterrupted(ws_runs):
    """The same run, uninterrupted, on 2 ranks and on 1 (same global batch)."""
    return ws_runs["refs"]


@pytest.mark.parametrize("case", range(len(KILLED)), ids=["2to1-main", "2to1-sampling", "1to2-main-resident",
                                                         "1to2-sampling-older-format"])
def test_killed_run_resumes_on_another_number_of_ranks(ws_runs, uninterrupted, case):
    before, after, _, resumed_from, variant = KILLED[case]
    seen, proc = ws_runs["killed"][case], ws_runs["resumed"][case]
    assert seen["returncode"] != 0, "the run was meant to be killed"
    assert seen.get("name") == resumed_from and seen["world_size"] == before, seen
    assert seen["format"] == "current" and not seen["full_state"]
    if variant == "older format":
        assert seen["older_format"] == ckpt.FULL_STATE and seen["verified"] is None
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stderr
    assert "resuming from" in log and resumed_from in log
    assert f"resumed on {after} ranks from a checkpoint of {before}" in log
    assert_same_run(seen["out"], uninterrupted[after], RTOL)


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


def checkpoint_files(path):
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


def test_no_checkpoint_file_grows_with_the_number_of_ranks(uninterrupted):
    """The same checkpoints written by 1 and by 2 ranks (both stages): every file of the 2-rank
    one is at most as large as the 1-rank one's (state.json holds the run's results, whose
    last digits may differ), and the only files added are the second rank's own bookkeeping."""
    names = [p.name for p, _ in ckpt.list_checkpoints(uninterrupted[2], warn=False)]
    assert {n.split("-")[0] for n in names} == {"sampling", "main"}, names
    for name in names:
        one, two = (checkpoint_files(uninterrupted[r] / "checkpoints" / name) for r in (1, 2))
        bookkeeping = {"rng/rank1.pt"} | ({"stats/rank1.safetensors"} if name.startswith("sampling") else set())
        assert set(two) - set(one) == bookkeeping and set(one) <= set(two), (name, sorted(two), sorted(one))
        for rel, size in one.items():
            limit = size + (16 if rel == "state.json" else 0) + (100 if rel == ckpt.MARKER else 0)
            assert two[rel] <= limit, (name, rel, two[rel], size)
        assert all(two[rel] < 16_384 for rel in bookkeeping), two


def test_the_optimizer_state_is_stored_once_and_the_planner_counts_its_bytes(uninterrupted):
    """Every checkpoint (both stages, 1 and 2 ranks) holds the fp32 master and the two AdamW
    moments once: optimizer_state.safetensors has exactly 12 bytes of data per trainable
    element, and the rest of the checkpoint besides the adapter has no room for a second copy
    of the moments (8 bytes per element). The planner's formula gives its total to 2%."""
    for ranks, run in uninterrupted.items():
        summary = json.loads((run / "summary.json").read_text())
        for path, state in ckpt.list_checkpoints(run, warn=False):
            files = checkpoint_files(path)
            shapes = json.loads((path / training_state.SCALARS).read_text())["shapes"]
            trainable = [math.prod(shape) for shape in shapes.values()]
            if state.stage == "main":
                assert sum(trainable) == summary["trainable_params"]
            with safe_open(str(path / training_state.TENSORS), framework="pt") as f:
                stored = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
            assert stored == {f"{kind}/{name}": math.prod(shape) for name, shape in shapes.items()
                              for kind in ("fp32", "exp_avg", "exp_avg_sq")}
            header = int.from_bytes((path / training_state.TENSORS).read_bytes()[:8], "little")
            assert files[training_state.TENSORS] - 8 - header == 12 * sum(trainable)
            rest = sum(size for rel, size in files.items() if rel != training_state.TENSORS and
                       not rel.startswith("adapter/"))
            assert rest < 8 * sum(trainable), (path, rest, sum(trainable))
            assert not any(rel.endswith(".pt") and not rel.startswith("rng/") for rel in files), files

            with safe_open(str(path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
                adapter = [math.prod(f.get_slice(k).get_shape()) for k in f.keys()]
            planned = checkpoint_bytes(trainable, adapter, 4, ranks, sampling=state.stage == "sampling",
                                       num_layers=4, num_modules=3)
            assert planned.total == pytest.approx(sum(files.values()), rel=0.02), (path, planned, files)
            assert planned.optimizer_state == pytest.approx(files[training_state.TENSORS], rel=0.02)
