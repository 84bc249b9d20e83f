"""The units the planner counts in: bytes per element of each dtype name, and GiB for printing."""

from __future__ import annotations

GiB = 1 << 30

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def size(n: int) -> str:
    """GiB with one decimal, or MiB below 1 GiB (so small rows do not read as zero)."""
    return gib(n) if n >= GiB else f"{n / (1 << 20):.0f} MiB"
