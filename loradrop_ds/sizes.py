"""The one grammar for sizes a user writes: ``80GB``, ``80GiB``, ``1.5 tb``, ``.5GB``.

Decimal units (KB, MB, GB, TB) are powers of 10 and binary ones (KiB ... TiB) powers of 2,
as huggingface_hub's ``parse_size_to_int`` reads ``max_shard_size``, so a size means here
what it means to transformers. A unit is required: a bare ``80`` is refused rather than
guessed. Used by the memory planner (``--gpu-mem``, ``--host-mem``) and the export
(``--max-shard-size``).
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]i?b)\s*$", re.IGNORECASE)
_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``"80GB"`` -> 80e9 bytes, ``"80GiB"`` -> 80 * 2**30; ValueError for anything else."""
    match = _SIZE.match(text or "")
    if not match:
        raise ValueError(f"{text!r} is not a memory size; write e.g. 80GB, 80GiB or 500MB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
