"""Rank-aware metrics logging (JSON lines + optional TensorBoard) and progress helpers."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from tqdm import tqdm

logger = logging.getLogger(__name__)

# Log the "tensorboard missing" notice once per process, not once per logger.
_tb_missing_reported = False


def _make_summary_writer(log_dir: Path) -> Any | None:
    global _tb_missing_reported
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _tb_missing_reported:
            _tb_missing_reported = True
            logger.info(
                "tensorboard is not installed; metrics go to metrics.jsonl only "
                "(pip install tensorboard to enable)"
            )
        return None
    return SummaryWriter(str(log_dir))


def _to_python(value: Any) -> Any:
    """Turn tensors / numpy scalars (anything with a scalar .item()) into plain
    Python values so json can write them; containers are converted recursively."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item):
        try:
            # 0-d / 1-element torch tensors and numpy scalars; .item() keeps the
            # dtype kind (float stays float, int stays int).
            return _to_python(item())
        except (ValueError, RuntimeError, TypeError):
            pass  # multi-element array: fall through to tolist/str
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        try:
            return _to_python(tolist())
        except Exception:  # noqa: BLE001 - logging must never break training
            pass
    return str(value)


class MetricsLogger:
    """Append-only metrics sink. Construct on every rank; pass enabled=False on
    non-zero ranks so call sites need no rank checks."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self._file: Any | None = None
        self._writer: Any | None = None
        self._closed = False
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Line-buffered append: each record hits the OS as it is written, and
        # restarts/resumes keep extending the same file.
        self._file = open(out / "metrics.jsonl", "a", encoding="utf-8", buffering=1)
        if tensorboard:
            self._writer = _make_summary_writer(out / "tensorboard")

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError("MetricsLogger.log called after close()")
        # step/time come from the arguments; same-named record keys are ignored.
        line: dict[str, Any] = {"step": int(step), "time": time.time()}
        for key, value in record.items():
            if key not in line:
                line[str(key)] = _to_python(value)
        # default=str is a last resort so an odd value can never raise here.
        self._file.write(json.dumps(line, default=str) + "\n")
        self._file.flush()

        if self._writer is not None:
            stage = line.get("stage")
            prefix = f"{stage}/" if isinstance(stage, str) and stage else ""
            for key, value in line.items():
                if key in ("step", "time"):
                    continue
                if isinstance(value, (int, float)):  # bool included, logged as 0/1
                    self._writer.add_scalar(f"{prefix}{key}", float(value), global_step=int(step))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """tqdm bar that is silently disabled (but still callable) on non-zero ranks."""
    return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=1.0, disable=not enabled)


_SUFFIXES = ("K", "M", "B", "T")


def format_count(n: int | float) -> str:
    """Human-readable count: 999 -> "999", 1234 -> "1.23K", 4_194_304 -> "4.19M"."""
    if not math.isfinite(n):
        raise ValueError(f"format_count: expected a finite number, got {n!r}")
    if abs(n) < 1000:
        return str(int(n))
    value = float(n)
    for suffix in _SUFFIXES:
        value /= 1000.0
        # Promote when rounding would print "1000.00K" (e.g. 999_999 -> "1.00M").
        if round(abs(value), 2) < 1000 or suffix == _SUFFIXES[-1]:
            return f"{value:.2f}{suffix}"
    raise AssertionError("unreachable")
