"""A full disk (or an exhausted quota) while a run or an export writes: one line naming the
path and what to do, raised as :class:`DiskFullError` (a user error: exit code 2 on every
rank, ``errors.USER_ERRORS``), never a traceback, a hang or a half-written output taken
for a whole one.

Not every writer says ENOSPC: ``torch.save`` (torch 2.13, ``caffe2/serialize/inline_container.cc``)
reports a short write as ``RuntimeError("[enforce fail at inline_container.cc:...] . unexpected
pos N vs M")`` with no errno, and safetensors as ``SafetensorError("... No space left on device
(os error 28)")``. So a failed write counts as a full disk when the error (or one it was raised
from) carries ENOSPC/EDQUOT, its text says so, or the filesystem it was writing to has
(almost) no space left right after it failed.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
# Below this many bytes free (to this user) after a failed write, the disk is what failed it:
# a writer that hit ENOSPC leaves less than one write buffer free.
LOW_FREE_BYTES = 1 << 20


class DiskFullError(RuntimeError):
    """A write failed for lack of space; the message names the path and the fix."""


def _free_bytes(path: Path) -> int | None:
    for d in (path, *path.parents):
        if d.exists():
            try:
                st = os.statvfs(d)
            except OSError:
                return None
            return st.f_bavail * st.f_frsize
    return None


def is_disk_full(exc: BaseException, path: str | os.PathLike) -> bool:
    """Whether ``exc``, raised while writing under ``path``, is a full disk or quota."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE_ERRNOS:
            return True
        if any(text in str(seen) for text in NO_SPACE_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    free = _free_bytes(Path(path))
    return free is not None and free < LOW_FREE_BYTES


@contextlib.contextmanager
def disk_full_reported(path: str | os.PathLike, fix: Callable[[], str]) -> Iterator[None]:
    """Turn a full disk inside the block (writing under ``path``) into a :class:`DiskFullError`:
    ``"no space left on device writing <file or path>: <fix()>"`` (``fix`` is called then, so
    it can say which checkpoint is left). Any other error passes unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not is_disk_full(e, path):
            raise
        where = getattr(e, "filename", None) or path
        raise DiskFullError(f"no space left on device writing {where}: {fix()}") from e
