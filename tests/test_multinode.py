"""Multi-node launch, tested on one machine: two launchers (``torchrun --nnodes 2
--node_rank R --nproc_per_node 1``, one rank each, static rendezvous on 127.0.0.1, the
flags ``launch/slurm_train.sh`` gives each node) run the whole LoRA-drop flow of
``launch/train.py``: sampling, selection, rebuild, main stage, save.

Both ranks must rebuild on the same selection. ``launch/train.py`` already refuses to
go on when they disagree (``check_selection_agreement``), but a non-main rank logs
nothing at INFO, so to see what each rank holds the launchers run a small wrapper
(written by the test) that records, on every rank, the selection passed to that
check and the one the rebuild's sharing plan is made from, then runs ``launch/train.py``
unchanged as ``__main__``."""

import json

from test_train_cli import tiny_args

from conftest import REPO, assert_adapter_reproduces_run, run_two_nodes, worker_exit_code

TRAIN = REPO / "launch" / "train.py"

# Runs train.py as the launchers would, after wrapping two functions of the package that
# train.py calls on every rank (it looks both up at call or import time, so the wrappers
# are what it calls). Each rank appends one JSON line per call to its own file.
RECORDING_WRAPPER = """\
import json, os, runpy, sys
from pathlib import Path

from loradrop_ds import distributed, importance

TRAIN = {train!r}
RECORD = Path({record_dir!r})
RANK = int(os.environ["RANK"])


def record(event, selection):
    line = {{"event": event, "rank": RANK, "fingerprint": selection.fingerprint(),
             "selection": json.loads(selection.to_json())}}
    with open(RECORD / f"rank{{RANK}}.jsonl", "a") as f:
        f.write(json.dumps(line) + "\\n")


_check, _plan = distributed.check_selection_agreement, importance.sharing_plan


def check_selection_agreement(selection, info):
    record("agreement_check", selection)
    return _check(selection, info)


def sharing_plan(selection):
    record("rebuild", selection)
    return _plan(selection)


distributed.check_selection_agreement = check_selection_agreement
importance.sharing_plan = sharing_plan  # train.py imports it by name when it runs below
sys.argv = [TRAIN, *sys.argv[1:]]
runpy.run_path(TRAIN, run_name="__main__")
"""


def test_two_nodes_run_the_whole_flow_on_one_selection(tiny_model, tmp_path):
    out = tmp_path / "run"  # on one machine both "nodes" see it, as a shared filesystem would
    record_dir = tmp_path / "record"
    record_dir.mkdir()
    wrapper = tmp_path / "train_recording.py"
    wrapper.write_text(RECORDING_WRAPPER.format(train=str(TRAIN), record_dir=str(record_dir)))
    args = tiny_args(tiny_model, out, "dist.timeout_minutes=5")
    procs = run_two_nodes(wrapper, [args, args], timeout=420)

    for node, proc in enumerate(procs):
        assert proc.returncode == 0, f"node {node}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        assert worker_exit_code(proc.stdout + proc.stderr) is None
    assert "=== loradrop_ds run summary ===" in procs[0].stdout  # global rank 0 lives on node 0
    assert "=== loradrop_ds run summary ===" not in procs[1].stdout

    # Both ranks checked the selection and rebuilt on it, once each, and hold the same one:
    # the one rank 0 computed and wrote to selection.json.
    written = json.loads((out / "selection.json").read_text())
    assert written["shared"] and written["kept"], written  # T=0.6 on 4 layers: some of each
    records = {rank: [json.loads(line) for line in (record_dir / f"rank{rank}.jsonl").read_text().splitlines()]
               for rank in (0, 1)}
    for rank, lines in records.items():
        assert [r["event"] for r in lines] == ["agreement_check", "rebuild"], (rank, lines)
        assert all(r["rank"] == rank for r in lines)
        for r in lines:
            assert r["selection"] == written, (rank, r["event"])
    assert records[0][1]["fingerprint"] == records[1][1]["fingerprint"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["sampling"]["steps"] == 3 and summary["main"]["steps"] == 4
    assert summary["kept"] == written["kept"]
    assert summary["trainable_params"] < summary["plain_lora_params"]
    # Each node wrote its own part of the last checkpoint (rank 1's RNG state, next to rank 0's).
    last = out / "checkpoints" / "main-step0000004"
    assert (last / "COMPLETE.json").is_file()
    assert {p.name for p in (last / "rng").iterdir()} == {"rank0.pt", "rank1.pt"}

    # The saved adapter, reloaded in plain transformers + peft (no DeepSpeed, one process),
    # gives the logits the two-node ZeRO-3 model gave at its final eval. fp32 both ways; the
    # only differences are summation order (sharded vs whole matmuls): 1e-5.
    assert_adapter_reproduces_run(tiny_model, out)
