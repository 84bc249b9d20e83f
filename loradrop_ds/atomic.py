"""Atomic writes: a reader, a crash or a second writer never sees half a file or half a
directory, and nothing already there is lost before its replacement is complete.

Every file or directory this project publishes goes through here (run outputs, adapters,
plots, the tokenised cache, the converted builtin model, exports), except DeepSpeed's
checkpoint shards, which every rank writes into one staging directory that rank 0 renames
(``run_checkpoint.save_run_checkpoint``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Literal


def _temp_name(path: Path) -> Path:
    # Beside the target (same filesystem: os.replace is a rename), hidden, unique per writer.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write_file(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, fsync: bool = False) -> Path:
    """``write(f)`` into a temporary file beside ``path``, then rename it over ``path``.
    ``fsync``: flushed to disk before the rename (manifests that certify other files).
    A plain open() (not mkstemp) keeps the usual umask-derived permissions."""
    target = Path(path)
    tmp = _temp_name(target)
    try:
        with open(tmp, "xb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """``text`` (UTF-8) into ``path``, atomically."""
    return atomic_write_file(path, lambda f: f.write(text.encode()), fsync=fsync)


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, *, if_exists: Literal["replace", "keep"] = "replace") -> Iterator[Path]:
    """A fresh directory beside ``final`` to write into; when the block ends without an
    error it becomes ``final``, and on an error it is removed.

    ``if_exists="replace"``: an existing ``final`` is swapped out first and removed only
    after the new one is in place. ``"keep"``: for caches that several machines may fill at
    once with the same content; if ``final`` appeared meanwhile, the first one stays and
    this copy is dropped."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if if_exists == "keep":
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():
                    raise
        else:
            old = None
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
