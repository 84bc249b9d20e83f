"""Fault injection for the tests: where a run can be made to die, fail or be signalled on
one rank.

Read from each rank's own environment at each point, so a test can break one rank (or one
node) only, and ``tests/workers/train_many.py`` can give each of its runs its own. A no-op
in real runs: every variable is unset.

``LORADROP_TEST_SIGKILL_AT=POINT``: rank 0 SIGKILLs itself at POINT (a preemption, an OOM
kill). ``LORADROP_TEST_FAIL_AT=POINT``: this rank raises :class:`InjectedFailure` (bad input:
exit code 2); ``POINT:crash`` raises a RuntimeError instead (an unexpected error: exit code 1),
``POINT:stall`` sleeps for 10 minutes (a hung rank) and ``POINT:enospc`` raises
``OSError(ENOSPC)`` for the file written there (a full disk: ``loradrop_ds.disk_full``). With
``LORADROP_TEST_FAIL_RANK=R`` only rank R fails.

``LORADROP_TEST_SIGNAL_AT=POINT[,POINT...]``: at each POINT this rank sends itself
``LORADROP_TEST_SIGNAL`` (default SIGUSR1), once per time the point is listed (``main:3,main:3``:
twice in a row); with ``LORADROP_TEST_SIGNAL_RANK=R`` only rank R does. As a scheduler's
signal would, it only sets the preemption flag (``loradrop_ds.preemption``).
``LORADROP_TEST_AWAIT_SIGNAL_AT=POINT``: this rank waits at POINT (up to 5 minutes) until a
preemption signal has reached it from outside, so a test can signal a launcher at a known step.

The points:
- ``STAGE:STEP`` (``sampling:3``, ``main:5``): after that optimizer step and everything the
  stage did after it (checkpoint, eval, selection check, prune update); see ``training``.
- every step run by ``distributed.run_on_every_rank``, by its name, before it runs
  (``inputs``, ``selection``, ``save``, ``checkpoint``, ...);
- ``before-marker:NAME`` and ``before-rename:NAME`` inside the write of checkpoint NAME
  (``run_checkpoint.save_run_checkpoint``); there also, as each rank starts writing its own
  files, ``rank-files:NAME``, and on rank 0 before the manifest, ``marker:NAME``;
- ``adapter`` and ``summary`` in the final save (``launch/train.py``'s ``save``), before that file.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import Any, Optional

from . import preemption


class InjectedFailure(ValueError):
    """Raised by LORADROP_TEST_FAIL_AT=POINT; counts as bad input (exit code 2)."""


def fault_point(info: Any, where: str, path: Optional[os.PathLike | str] = None) -> None:
    """Die, stall, raise or signal here if this rank's environment asks for it at ``where``
    (``path``: the file written there, named by an injected full disk)."""
    env = os.environ.get
    if env("LORADROP_TEST_SIGKILL_AT") == where and info.is_main:
        os.kill(os.getpid(), signal.SIGKILL)
    signal_rank = env("LORADROP_TEST_SIGNAL_RANK")
    if signal_rank is None or int(signal_rank) == info.rank:
        for _ in range(env("LORADROP_TEST_SIGNAL_AT", "").split(",").count(where)):
            os.kill(os.getpid(), signal.Signals[env("LORADROP_TEST_SIGNAL", "SIGUSR1")])
    if env("LORADROP_TEST_AWAIT_SIGNAL_AT") == where:
        deadline = time.monotonic() + 300
        while not preemption.requested() and time.monotonic() < deadline:
            time.sleep(0.05)
    fail_at = env("LORADROP_TEST_FAIL_AT")
    fail_rank = env("LORADROP_TEST_FAIL_RANK")
    if fail_rank is not None and int(fail_rank) != info.rank:
        return
    if fail_at == f"{where}:enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path is not None else where)
    if fail_at == f"{where}:stall":
        time.sleep(600)
    if fail_at == f"{where}:crash":
        raise RuntimeError(f"injected crash at {where} (LORADROP_TEST_FAIL_AT)")
    if fail_at == where:
        raise InjectedFailure(f"injected failure at {where} (LORADROP_TEST_FAIL_AT)")
