"""Fault injection for the tests: where a run can be made to die or fail on one rank.

Read from each rank's own environment, so a test can break one rank (or one node) only.
A no-op in real runs: both variables are unset.

``LORADROP_TEST_SIGKILL_AT=POINT``: rank 0 SIGKILLs itself at POINT (a preemption, an OOM
kill). ``LORADROP_TEST_FAIL_AT=POINT``: this rank raises :class:`InjectedFailure` (bad input:
exit code 2); ``POINT:crash`` raises a RuntimeError instead (an unexpected error: exit code 1)
and ``POINT:stall`` sleeps for 10 minutes (a hung rank).

The points:
- ``STAGE:STEP`` (``sampling:3``, ``main:5``): after that optimizer step and everything the
  stage did after it (checkpoint, eval, selection check, prune update); see ``training``.
- every step run by ``distributed.run_on_every_rank``, by its name, before it runs
  (``inputs``, ``selection``, ``save``, ``checkpoint``, ...);
- ``before-marker:NAME`` and ``before-rename:NAME`` inside the write of checkpoint NAME
  (``run_checkpoint.save_run_checkpoint``).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

SIGKILL_AT = os.environ.get("LORADROP_TEST_SIGKILL_AT")
FAIL_AT = os.environ.get("LORADROP_TEST_FAIL_AT")


class InjectedFailure(ValueError):
    """Raised by LORADROP_TEST_FAIL_AT=POINT; counts as bad input (exit code 2)."""


def fault_point(info: Any, where: str) -> None:
    """Die, stall or raise here if this rank's environment asks for it at ``where``."""
    if SIGKILL_AT == where and info.is_main:
        os.kill(os.getpid(), signal.SIGKILL)
    if FAIL_AT == f"{where}:stall":
        time.sleep(600)
    if FAIL_AT == f"{where}:crash":
        raise RuntimeError(f"injected crash at {where} (LORADROP_TEST_FAIL_AT)")
    if FAIL_AT == where:
        raise InjectedFailure(f"injected failure at {where} (LORADROP_TEST_FAIL_AT)")
