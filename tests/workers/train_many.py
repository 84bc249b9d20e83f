"""Several launch/train.py runs, one after another, in one set of rank processes.

torchrun --nproc_per_node N tests/workers/train_many.py JOBS_JSON

JOBS_JSON holds ``[{"argv": [...], "log": PATH, "env": {...}}, ...]`` (``env`` optional).
Each run is ``train.run_cli(argv)`` (the CLI less its final ``os._exit``), with ``env`` added
to the environment for that run only, this rank's stdout and stderr sent to ``PATH.rank<R>``
and its exit code written to ``PATH.code<R>``. What this saves is the start of the processes
(the interpreter, torch, DeepSpeed, transformers, the process group: most of a tiny run), so
it is for runs whose tests read what the run wrote or said, not how a fresh process behaves:
one world size, and of the fault injection (``loradrop_ds.faults``, read at each point) only
what leaves the process alive: signals and injected errors, no SIGKILL or stall. A run
stopped for preemption returns its exit code (75) like any other. Each run seeds its own RNG
(``lora.add_lora``), releases its engines (``deepspeed_private.release_engine``) and installs
its own signal handlers (``preemption.install``), as a run that follows another in the same
process must; tests/test_engine.py checks the release on its own.
"""

import contextlib
import gc
import json
import os
import runpy
import sys
from pathlib import Path

from loradrop_ds import distributed


def main(jobs_file: str) -> None:
    train = runpy.run_path(str(Path(__file__).resolve().parents[2] / "launch" / "train.py"), run_name="train_many")
    # What lives as long as the process (the imports: modules, classes, functions; some 180k
    # objects, 580k after the first run's lazy imports) is kept out of the cyclic collector, so
    # each gc.collect() of a run (train.py and release_engine collect several times per run)
    # scans only what that run made: measured, 2.1 instead of 3.8 CPU s per tiny 1-rank run.
    # After each run its garbage is collected first, so only what outlives it (caches, the
    # process group) is frozen; what the next run makes is collected as before.
    gc.freeze()
    rank = int(os.environ.get("RANK", "0"))
    for job in json.loads(Path(jobs_file).read_text()):
        env = job.get("env", {})
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        with open(f"{job['log']}.rank{rank}", "w") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            code = train["run_cli"](job["argv"])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
        Path(f"{job['log']}.code{rank}").write_text(str(code))
        gc.collect()
        gc.freeze()
    distributed.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1])
