"""Checkpoints and exact resume, 2 ranks, fp32: runs killed with SIGKILL mid-sampling and
mid-main-stage, resumed with resume=auto, end exactly as an uninterrupted run."""

import json
import logging
import random
import shutil
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, finished_run_args, run_ranks, run_ranks_many
from loradrop_ds import preemption, training_state
from loradrop_ds import run_checkpoint as ckpt

TRAIN = REPO / "launch" / "train.py"


args = finished_run_args


def losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows if "loss" in r]


def assert_same_run(out, ref, rtol=1e-6):
    """Per-step losses, the adapter and the selection's statistics of two runs agree."""
    got, want = losses(out), losses(ref)
    assert [(s, n) for s, n, _ in got] == [(s, n) for s, n, _ in want]
    for (stage, step, a), (_, _, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=rtol, abs=1e-7), (stage, step, a, b)
    mine = load_file(out / "adapter" / "adapter_model.safetensors")
    theirs = load_file(ref / "adapter" / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], rtol=rtol, atol=1e-6)
    # The selection's inputs, not only its outcome: the statistics summed over the sampling
    # stage (including the steps before the kill, restored from the checkpoint) and the tokens.
    mine, theirs = (json.loads((d / "selection.json").read_text()) for d in (out, ref))
    assert mine["kept"] == theirs["kept"] and mine["token_count"] == theirs["token_count"]
    assert mine["raw_sums"] == pytest.approx(theirs["raw_sums"], rel=rtol)


@pytest.fixture
def reference_run(finished_run):
    return finished_run


def truncate_newest(run_dir) -> dict:
    """After the kill in main step 5: truncate main-step0000004's optimizer state; what was there before."""
    newest = run_dir / "checkpoints" / "main-step0000004"
    seen = {"newest": newest.is_dir(), "previous": (run_dir / "checkpoints" / "main-step0000002").is_dir()}
    victim = newest / training_state.TENSORS
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    return seen


def half_written(name: str):
    """After a kill inside the write of checkpoint ``name``: what is on disk, and what each way
    of choosing a checkpoint makes of the half-written ``.tmp-*`` directory."""
    def look(run_dir) -> dict:
        tmp = run_dir / "checkpoints" / f".tmp-{name}"
        seen = {"tmp": tmp.is_dir(), "final": (run_dir / "checkpoints" / name).exists(),
                "marker": (tmp / ckpt.MARKER).is_file(), "explicit": None}
        try:
            ckpt.find_resume_checkpoint(str(tmp), run_dir)
        except ckpt.CheckpointError as e:
            seen["explicit"] = str(e)
        seen["auto"] = ckpt.find_resume_checkpoint("auto", run_dir)[0].name
        return seen

    return look


def hpz_config(root) -> str:
    """zero3_tiny.json with ZeRO++ hpZ over both ranks (one hpZ group)."""
    config = json.loads((REPO / "ds_configs" / "zero3_tiny.json").read_text())
    config["zero_optimization"]["zero_hpz_partition_size"] = 2
    (root / "hpz.json").write_text(json.dumps(config))
    return f"deepspeed={root / 'hpz.json'}"


# Runs killed with SIGKILL (each in processes of its own), then resumed: case -> (kill point,
# whether the run's overrides add hpZ, what to do to / look at the output_dir after the kill).
KILLED = {
    "mid_sampling": ("sampling:3", False, None),
    "mid_main": ("main:5", False, truncate_newest),
    "before-marker": ("before-marker:main-step0000004", False, half_written("main-step0000004")),
    "before-rename": ("before-rename:main-step0000004", False, half_written("main-step0000004")),
    "hpz": ("main:5", True, None),
}


@pytest.fixture(scope="module")
def resume_runs(tiny_model, tmp_path_factory) -> dict:
    """Every run of KILLED killed in its own rank processes; then, in one set of rank processes
    (run_ranks_many), the preempted chains (``preempt_chains``) and every killed run's resume.
    ``killed``: per case, the kill's exit code, whether an adapter was left, and what the case's
    look after the kill saw; ``resumed``: per case, its resume's result; ``chains``: the logs'
    parent, the chains' runs and their results."""
    tmp = tmp_path_factory.mktemp("resume")
    hpz = hpz_config(tmp)
    killed, resume_argvs = {}, []
    for case, (at, with_hpz, after_kill) in KILLED.items():
        out = tmp / case / "run"
        argv = args(tiny_model, out, *([hpz] if with_hpz else []))
        proc = run_ranks(TRAIN, argv, check=False, extra_env={"LORADROP_TEST_SIGKILL_AT": at})
        killed[case] = {"returncode": proc.returncode, "adapter": (out / "adapter").exists(),
                        **(after_kill(out) if after_kill else {})}
        resume_argvs.append(argv)
    chains = preempt_chains()
    envs = [{**env, preemption.MARKER_ENV: str(tmp / f"run{i}.marker.json")} for i, (_, env, _, _) in enumerate(chains)]
    procs = run_ranks_many([args(tiny_model, tmp / chain) for chain, _, _, _ in chains] + resume_argvs, tmp / "logs",
                           check=False, envs=envs + [{}] * len(resume_argvs))
    return {"killed": killed, "resumed": dict(zip(KILLED, procs[len(chains):], strict=True)),
            "chains": (tmp, chains, procs[:len(chains)])}


def killed_and_resumed(resume_runs, case: str) -> tuple[dict, str]:
    """The case's kill really killed the run (no adapter), and its resume ended well: what
    was seen after the kill, and the resume's log."""
    killed, proc = resume_runs["killed"][case], resume_runs["resumed"][case]
    assert killed["returncode"] != 0, "the run was meant to be killed"
    assert not killed["adapter"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    return killed, proc.stderr


def test_killed_mid_sampling_resumes_exactly(resume_runs, reference_run):
    _, log = killed_and_resumed(resume_runs, "mid_sampling")
    assert "resuming from" in log and "sampling-step0000002" in log
    assert_same_run(resume_dir(resume_runs, "mid_sampling"), reference_run)


def test_killed_mid_main_resumes_exactly_skipping_a_truncated_checkpoint(resume_runs, reference_run):
    seen, log = killed_and_resumed(resume_runs, "mid_main")
    assert seen["newest"] and seen["previous"]  # main-step0000004 (truncated after the kill) and 2
    assert "skipping checkpoint" in log and "main-step0000004" in log and "truncated" in log
    assert "resuming from" in log and "main-step0000002" in log
    assert_same_run(resume_dir(resume_runs, "mid_main"), reference_run)


def resume_dir(resume_runs, case: str):
    return resume_runs["chains"][0] / case / "run"


def test_checkpoint_without_marker_is_skipped_and_pruning_keeps_the_newest(reference_run, tmp_path, caplog):
    run = tmp_path / "copy"
    shutil.copytree(reference_run, run)
    names = [p.name for p, _ in ckpt.list_checkpoints(run)]
    assert names == ["main-step0000006", "main-step0000004", "main-step0000002"]  # keep_last=3
    (run / "checkpoints" / "main-step0000006" / ckpt.MARKER).unlink()
    (run / "summary.json").unlink()  # an unfinished run: resume=auto refuses a finished one
    shutil.rmtree(run / "adapter")
    with caplog.at_level(logging.WARNING):
        path, state = ckpt.find_resume_checkpoint("auto", run)
    assert path.name == "main-step0000004" and state.stage == "main" and state.step == 4
    assert "no COMPLETE.json" in caplog.text
    assert state.selection is not None and state.world_size == 2


def test_checkpoint_holds_no_frozen_base_weights(reference_run, tiny_model):
    newest = reference_run / "checkpoints" / "main-step0000006"
    checkpoint_bytes = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
    base_bytes = (tiny_model / "model.safetensors").stat().st_size
    adapter_bytes = (newest / "adapter" / "adapter_model.safetensors").stat().st_size
    state_bytes = (newest / training_state.TENSORS).stat().st_size
    # LoRA weights, their fp32 master copy and two Adam moments, plus bookkeeping; the
    # frozen base model alone would be more than this.
    assert checkpoint_bytes < 0.5 * base_bytes, (checkpoint_bytes, base_bytes)
    assert state_bytes < 12 * adapter_bytes, (state_bytes, adapter_bytes)


def test_resume_refuses_a_finished_run_other_settings_and_never(tiny_model, reference_run, tmp_path):
    finished, unfinished = tmp_path / "finished", tmp_path / "unfinished"
    shutil.copytree(reference_run, finished)
    shutil.copytree(reference_run, unfinished)
    (unfinished / "summary.json").unlink()  # as if killed after its last checkpoint, before the end
    shutil.rmtree(unfinished / "adapter")
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    # One process, one run after another (run_ranks_many); each must refuse before changing anything.
    procs = run_ranks_many([args(tiny_model, finished),  # resume=auto on a finished run
                            args(tiny_model, unfinished, "lora.r=4"),
                            args(tiny_model, unfinished, "train.grad_accum=3"),  # 1 rank, another global batch
                            args(tiny_model, unfinished, "resume=never"),
                            args(tiny_model, unfinished, f"resume={tmp_path}/nothing")],
                           tmp_path / "logs", nproc=1, check=False)
    finished_run, other_r, other_batch, never, nothing = procs
    assert finished_run.returncode == 2 and "holds a finished run (summary.json, adapter)" in finished_run.stderr, \
        finished_run.stderr[-2000:]
    assert "overwrite=true" in finished_run.stderr and "new output_dir" in finished_run.stderr
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == before  # not a byte changed
    assert other_r.returncode == 2 and "lora.r: checkpoint 8, now 4" in other_r.stderr, other_r.stderr[-2000:]
    assert other_batch.returncode == 2 and "train.grad_accum: checkpoint 1, now 3" in other_batch.stderr, \
        other_batch.stderr[-2000:]
    assert never.returncode == 2 and "already holds a run and resume=never" in never.stderr
    assert nothing.returncode == 2 and "no such checkpoint directory" in nothing.stderr
    # Nothing was overwritten by the refused runs.
    assert [p.name for p, _ in ckpt.list_checkpoints(unfinished)] == ["main-step0000006", "main-step0000004",
                                                                     "main-step0000002"]


def test_the_refusal_of_a_finished_run_says_how_it_differs(tiny_model, reference_run, tmp_path):
    """A finished run asked to train again is refused in one line that says what differs: the
    settings (each key with both values), the base model, or which file cannot be read."""
    runs = {name: tmp_path / name for name in ("same", "settings", "base", "garbled")}
    for run in runs.values():
        shutil.copytree(reference_run, run)
    other_base = tmp_path / "other_base"
    shutil.copytree(tiny_model, other_base)
    config = json.loads((other_base / "config.json").read_text())
    (other_base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 2e-6}))
    state = runs["garbled"] / "checkpoints" / "main-step0000006" / "state.json"
    state.write_bytes(b"{" * state.stat().st_size)  # the manifest's size, unreadable content
    before = {p: p.read_bytes() for run in runs.values() for p in run.rglob("*") if p.is_file()}
    procs = dict(zip(runs, run_ranks_many([args(tiny_model, runs["same"]), args(tiny_model, runs["settings"], "lora.r=4"),
                                           args(other_base, runs["base"]), args(tiny_model, runs["garbled"])],
                                          tmp_path / "logs", nproc=1, check=False), strict=True))
    errors = {name: [line for line in proc.stderr.splitlines() if line.startswith("error:")] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 2 and len(errors[name]) == 1, (name, proc.stderr[-2000:])
        assert "holds a finished run (summary.json, adapter)" in errors[name][0] and "overwrite=true" in errors[name][0]
    assert "made with these settings" in errors["same"][0]
    assert "made with other settings (lora.r: checkpoint 8, now 4)" in errors["settings"][0], errors["settings"]
    assert "trained on another base model" in errors["base"][0] and "config.json differs" in errors["base"][0]
    assert f"{state} cannot be read as a run state" in errors["garbled"][0], errors["garbled"]
    assert {p: p.read_bytes() for run in runs.values() for p in run.rglob("*") if p.is_file()} == before
    # Without its finish, the run resumes from the newest checkpoint it can read: the garbled
    # one is skipped like an unfinished write.
    (runs["garbled"] / "summary.json").unlink()
    shutil.rmtree(runs["garbled"] / "adapter")
    assert [p.name for p, _ in ckpt.list_checkpoints(runs["garbled"])] == ["main-step0000004", "main-step0000002"]
    with pytest.raises(ckpt.CheckpointError, match="cannot be read as a run state"):
        ckpt.find_resume_checkpoint(str(state.parent), runs["garbled"])


def test_a_checkpoint_with_only_deepspeeds_files_is_refused_in_one_line(reference_run, tmp_path):
    """A checkpoint from before the rank-independent state existed holds its optimizer state
    only in DeepSpeed's ds/ files, which are no longer read: refused, saying what to do, on the
    same number of ranks as on another."""
    run = tmp_path / "copy"
    shutil.copytree(reference_run, run)
    path = run / "checkpoints" / "main-step0000006"
    for name in (training_state.TENSORS, training_state.SCALARS):
        (path / name).unlink()
    (path / "ds").mkdir()
    state = ckpt.read_state(path)
    for ranks in (state.world_size, 1):
        with pytest.raises(ckpt.CheckpointError) as refused:
            ckpt.check_compatible(state, state.config, ranks, state.base_model, path)
        message = str(refused.value)
        assert "\n" not in message and f"{path} holds neither {training_state.TENSORS} nor" in message, message
        assert "the version that wrote it" in message and "overwrite=true" in message


@pytest.mark.parametrize("point", ["before-marker", "before-rename"])
def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(resume_runs, reference_run, point):
    """Killed inside the write of main-step0000004: before its manifest is written, or
    with the manifest written but the directory not yet renamed. The half-written
    ``.tmp-*`` directory is never taken for a checkpoint; the run resumes from step 2 and
    ends as the uninterrupted one."""
    seen, log = killed_and_resumed(resume_runs, point)
    assert seen["tmp"] and not seen["final"]
    assert seen["marker"] == (point == "before-rename")
    assert seen["explicit"] is not None and "not a checkpoint directory" in seen["explicit"], seen
    assert seen["auto"] == "main-step0000002"
    assert "resuming from" in log and "main-step0000002" in log
    out = resume_dir(resume_runs, point)
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the stale temporary was cleaned up
    assert_same_run(out, reference_run)


def test_manifest_lists_every_ranks_files(reference_run):
    """COMPLETE.json is built from each rank's own list of what it wrote: it names exactly
    the files on disk, both ranks' among them, with their sizes."""
    for path, _ in ckpt.list_checkpoints(reference_run):
        files = json.loads((path / ckpt.MARKER).read_text())["files"]
        on_disk = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*")
                   if p.is_file() and p.name != ckpt.MARKER}
        assert files == on_disk, path
        for rank in (0, 1):
            assert f"rng/rank{rank}.pt" in files
        # The optimizer state once, rank-independent; no DeepSpeed per-rank copy of it.
        assert training_state.TENSORS in files and training_state.SCALARS in files
        assert not any(f.startswith("ds/") or f == ckpt.FULL_STATE for f in files), files


def test_hierarchical_partitioning_trains_and_resumes_the_same(resume_runs, reference_run):
    """ZeRO++ hpZ (a secondary copy of the parameters inside each node, as the multi-node
    recipe uses) gives the same run, killed in the main stage and resumed: here with both
    ranks in one hpZ group. The resume writes the parameters' partitions afresh, so the
    secondary copies made when the engine was built must be dropped, as DeepSpeed's own
    load does (``deepspeed_private.restore_working_copy``), or the forward gathers the
    initial LoRA weights from them."""
    _, log = killed_and_resumed(resume_runs, "hpz")
    assert "resuming from" in log and "main-step0000004" in log
    assert_same_run(resume_dir(resume_runs, "hpz"), reference_run)


def test_settings_added_since_a_checkpoint_compare_as_their_defaults():
    """A checkpoint written before a setting existed ran as its default: resuming it with the
    default is the same run, with anything else it is not."""
    from loradrop_ds import config as config_lib

    current = config_lib.to_dict(config_lib.load_config(None))
    saved = json.loads(json.dumps(current))
    for key in ("selection", "param_budget", "shared_scale", "auto_check_every"):
        del saved["loradrop"][key]
    assert ckpt.config_differences(saved, current) == []
    changed = config_lib.to_dict(config_lib.load_config(None, ["loradrop.shared_scale=vector"]))
    assert ckpt.config_differences(saved, changed) == ["loradrop.shared_scale: checkpoint 'none', now 'vector'"]


# ------------------------------------------------------------------------------ preemption
# A stop signal (train.preempt_signals) is delivered at a chosen point by loradrop_ds.faults
# (LORADROP_TEST_SIGNAL_AT: the rank sends it to itself, where a scheduler's would arrive).
# Every rank learns it at the next step's all-reduce, checkpoints that step and exits with
# preemption.EXIT_CODE; the same command resumes. Two chains of runs through both stages,
# each ending as the uninterrupted reference run, all in one set of rank processes
# (run_ranks_many). The steps are drawn at random with a fixed seed, named in any failure.
PREEMPT_SEED = 20260419


def preempt_chains() -> list[tuple[str, dict, int, Optional[str]]]:
    """(chain, signal injection, expected exit code, checkpoint the run stops at) per run."""
    rng = random.Random(PREEMPT_SEED)
    main_step, sampling_step = rng.randint(1, 4), rng.randint(1, 2)
    a = {"LORADROP_TEST_SIGNAL": "SIGUSR1", "LORADROP_TEST_SIGNAL_RANK": "1"}  # rank 1 only
    b = {"LORADROP_TEST_SIGNAL": "SIGTERM", "LORADROP_TEST_SIGNAL_RANK": "0"}  # rank 0 only
    return [
        # After sampling step 3: learned at step 4, the stage's last, so the run stops at the
        # stage's end checkpoint (with the selection), before the rebuild.
        ("A", {**a, "LORADROP_TEST_SIGNAL_AT": "sampling:3"}, 75, "sampling-step0000004"),
        # After a random main step: every rank stops after the next one.
        ("A", {**a, "LORADROP_TEST_SIGNAL_AT": f"main:{main_step}"}, 75, f"main-step{main_step + 1:07d}"),
        # During the final save, after the last step boundary: the run finishes (exit 0).
        ("A", {**a, "LORADROP_TEST_SIGNAL_AT": "save"}, 0, None),
        # After a random sampling step: a mid-stage checkpoint, with the partial statistics.
        ("B", {**b, "LORADROP_TEST_SIGNAL_AT": f"sampling:{sampling_step}"}, 75, f"sampling-step{sampling_step + 1:07d}"),
        # Between the stages (during the selection): learned at main step 1.
        ("B", {**b, "LORADROP_TEST_SIGNAL_AT": "selection"}, 75, "main-step0000001"),
        # Twice in a row, to both ranks, while main-step0000004 is being written: the write
        # completes, and every rank stops after step 5.
        ("B", {"LORADROP_TEST_SIGNAL": "SIGTERM",
               "LORADROP_TEST_SIGNAL_AT": "before-marker:main-step0000004,before-marker:main-step0000004"}, 75,
         "main-step0000005"),
        ("B", {}, 0, None),
    ]


def test_preempted_runs_stop_together_and_resume_to_the_uninterrupted_one(resume_runs, reference_run):
    tmp, runs, procs = resume_runs["chains"]
    for i, ((chain, env, code, checkpoint), proc) in enumerate(zip(runs, procs, strict=True)):
        where = f"seed {PREEMPT_SEED}, run {i} (chain {chain}), {env}"
        assert proc.returncode == code, (where, proc.stderr[-4000:])  # the same code on every rank (run_ranks_many)
        marker = tmp / f"run{i}.marker.json"
        if code == 0:
            assert not marker.exists(), where
            continue
        # Every rank stopped after the same step, once that step's checkpoint was complete.
        stage, step = checkpoint.split("-step")
        for rank in (0, 1):
            log = (tmp / "logs" / f"run{i}.rank{rank}").read_text()
            assert f"preempted: stopped for preemption after {stage} step {int(step)}; checkpoint " in log, (where, rank)
        record = json.loads(marker.read_text())
        assert (record["exit_code"], record["stage"], record["step"]) == (75, stage, int(step)), (where, record)
        assert record["checkpoint"] == str(tmp / chain / "checkpoints" / checkpoint), (where, record)
        # The marker lists rank 0's signals: both of a repeated one.
        sent = [env["LORADROP_TEST_SIGNAL"]] * len(env["LORADROP_TEST_SIGNAL_AT"].split(","))
        assert record["signals"] == (sent if env.get("LORADROP_TEST_SIGNAL_RANK", "0") == "0" else []), (where, record)
        resumed = procs[i + 1].stderr  # the next run of the chain resumed from exactly that checkpoint
        assert "resuming from" in resumed and checkpoint in resumed, (where, resumed[-3000:])
    save_signalled = (tmp / "logs" / "run2.rank1").read_text()
    assert "SIGUSR1 after the last step boundary: the run finished instead" in save_signalled
    assert preemption.EXIT_CODE == 75  # the documented code (docs/LAUNCHING.md)
    assert_same_run(tmp / "A", reference_run)
    assert_same_run(tmp / "B", reference_run)
