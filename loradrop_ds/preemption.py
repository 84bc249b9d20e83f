"""Preemption: when the cluster asks a run to stop, every rank stops at the same step
boundary with a checkpoint, and the process exits with :data:`EXIT_CODE`.

SLURM sends SIGTERM to every process of a job it preempts (``GraceTime`` before it kills
it) or at its time limit, and with ``sbatch --signal=B:USR1@120`` a signal of the job's
choice ahead of the limit (``launch/slurm_train.sh``). The signals named in
``train.preempt_signals`` only set a flag here: the handler runs no collective and writes
no file. Each optimizer step ends with one all-reduce of the loss
(``training.TrainingStage``); the flag rides on that all-reduce, so every rank learns at the
same step that some rank was signalled, and preemption costs no extra collective per step.
Every rank then writes the checkpoint of that step, rank 0 writes the marker (below), and
every rank exits with :data:`EXIT_CODE`. ``resume=auto`` continues from that checkpoint.

A signal that arrives while a rank is stopping (during the checkpoint write) only adds to
the record: the write goes on. Launchers may hide the exit code (torchrun reports 1 for any
failed worker, see ``launch/slurm_train.sh``), so rank 0 also writes the marker
``output_dir/PREEMPTED.json`` (or the file named by ``LORADROP_PREEMPTED_FILE``) after the
checkpoint is complete on every rank; a run clears it when it starts.

The handlers are Python-level (``signal.signal``): the C handler CPython installs only
records the signal, and the function below runs in the main thread between bytecodes, so
a signal during a collective or a kernel is seen when that call returns.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

from .atomic import atomic_write_text

log = logging.getLogger(__name__)

# EX_TEMPFAIL in sysexits.h ("try again later"): stopped with a checkpoint, resumable.
# launch/slurm_train.sh holds a copy (PREEMPTED_EXIT_CODE); tests/test_launch.py checks they agree.
EXIT_CODE = 75
MARKER = "PREEMPTED.json"
MARKER_ENV = "LORADROP_PREEMPTED_FILE"  # the marker's path instead of output_dir/PREEMPTED.json
# Signals a run may stop on (train.preempt_signals): the catchable ones schedulers and users
# send to ask a process to end. SIGKILL and SIGSTOP cannot be caught.
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")

_received: list[int] = []  # signal numbers in arrival order; only the handler appends
_previous: dict[signal.Signals, Any] = {}  # the handlers install() replaced


class Preempted(Exception):
    """Raised on every rank once the checkpoint at (stage, step) is complete; the CLI exits
    with :data:`EXIT_CODE`."""

    def __init__(self, stage: str, step: int, checkpoint: Path):
        super().__init__(f"stopped for preemption after {stage} step {step}; checkpoint {checkpoint}")
        self.stage, self.step, self.checkpoint = stage, step, checkpoint


def _on_signal(signum: int, frame: Any) -> None:
    # Only a flag: the run reads it at its next step boundary (requested()).
    _received.append(signum)


def install(names: list[str]) -> None:
    """Stop on the signals ``names`` (from :data:`SIGNALS`) from now on, forgetting any
    received before; an empty list restores the handlers an earlier call replaced. Signal
    handlers can only be set in the main thread: elsewhere (a run driven from a thread) the
    run does not stop on signals, and says so."""
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    _received.clear()
    if not names:
        return
    if threading.current_thread() is not threading.main_thread():
        log.warning("train.preempt_signals: not in the main thread, so %s will not stop the run at a step boundary",
                    ", ".join(names))
        return
    for name in names:
        sig = signal.Signals[name]
        _previous[sig] = signal.signal(sig, _on_signal)


def requested() -> bool:
    """Whether this rank has received a stop signal since :func:`install`."""
    return bool(_received)


def received() -> list[str]:
    """The signals this rank received since :func:`install`, in order (repeats included)."""
    return [signal.Signals(s).name for s in list(_received)]


def marker_path(out_dir: Path) -> Path:
    env = os.environ.get(MARKER_ENV)
    return Path(env) if env else Path(out_dir) / MARKER


def clear_marker(out_dir: Path) -> None:
    """Remove the marker an earlier, preempted run left (rank 0, as the run starts)."""
    marker_path(out_dir).unlink(missing_ok=True)


def write_marker(out_dir: Path, stage: str, step: int, checkpoint: Path) -> Optional[Path]:
    """Rank 0, once the checkpoint is complete on every rank: the marker, atomically. A
    failure to write it is logged, not raised: the checkpoint is what resuming needs."""
    path = marker_path(out_dir)
    record = {"exit_code": EXIT_CODE, "stage": stage, "step": step, "checkpoint": str(checkpoint),
              "signals": received(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    except OSError as e:
        log.error("could not write the preemption marker %s: %s", path, e)
        return None
    return path
