"""The one reader of a safetensors file's header: the 8-byte little-endian length, the JSON
header it announces, and the checks of the tensors' byte ranges against the file; no tensor is read.
And its one writer, for files written tensor by tensor (:func:`encode_header`): a checkpoint's
training state is streamed to disk one parameter at a time, never held whole.

A problem is raised as :class:`HeaderProblem`, whose ``kind`` and numbers let each caller word
its own error (``model.check_weight_files`` before training, the export's checks of the adapter,
the base and the prune masks).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PREFIX_BYTES = 8  # the header's length, little-endian
# Bytes per element of safetensors' dtypes (others, such as packed sub-byte ones, get the offsets checked only).
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


class HeaderProblem(ValueError):
    """Why a file is not a whole safetensors file. ``kind``:

    * ``short``: under 8 bytes, no length prefix;
    * ``header-overrun``: the length prefix asks for more bytes than the file has;
    * ``not-json``: the header is not a JSON object;
    * ``bad-tensor``: ``tensor``'s entry is unreadable (:func:`data_end`) or its dtype, shape and
      offsets disagree (:func:`check_tensors`);
    * ``data-overrun``: ``tensor`` ends at data byte ``end``, past the file's data;
    * ``trailing``: the data holds bytes after its last tensor (``end``)."""

    def __init__(self, kind: str, path: Path, size: int, length: int, tensor: Optional[str] = None,
                 end: Optional[int] = None):
        super().__init__(f"{path}: {kind}")
        self.kind, self.path, self.size, self.length, self.tensor, self.end = kind, path, size, length, tensor, end

    @property
    def data_bytes(self) -> int:
        return self.size - PREFIX_BYTES - self.length


@dataclass(frozen=True)
class Header:
    """A safetensors header as read: the tensors' entries (``dtype``, ``shape``, ``data_offsets``
    into the data after the header), without ``__metadata__``."""

    path: Path
    size: int  # the file's bytes
    length: int  # the JSON header's bytes
    tensors: dict

    @property
    def data_bytes(self) -> int:
        return self.size - PREFIX_BYTES - self.length

    def problem(self, kind: str, tensor: Optional[str] = None, end: Optional[int] = None) -> HeaderProblem:
        return HeaderProblem(kind, self.path, self.size, self.length, tensor, end)


def read_header(path: Path) -> Header:
    """The header of ``path``: the length prefix within the file and a JSON object after it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(PREFIX_BYTES)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < PREFIX_BYTES:
            raise HeaderProblem("short", path, size, length)
        if length > size - PREFIX_BYTES:
            raise HeaderProblem("header-overrun", path, size, length)
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            header = None
    if not isinstance(header, dict):
        raise HeaderProblem("not-json", path, size, length)
    header.pop("__metadata__", None)
    return Header(path, size, length, header)


def data_end(header: Header) -> int:
    """Where the last tensor's data ends, as the offsets say (nothing else of an entry is looked
    at); an entry without a readable end offset is a ``bad-tensor`` problem."""
    end = 0
    for name, info in header.tensors.items():
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise header.problem("bad-tensor", name) from None
    return end


def check_tensors(header: Header) -> None:
    """Every tensor's byte range fits its dtype and shape and lies in the data, and the tensors
    end where the file does (tensor by tensor, in header order, the first problem raised)."""
    end_max = 0
    for name, info in header.tensors.items():
        try:
            start, end = info["data_offsets"]
            per = DTYPE_BYTES.get(info["dtype"], 0) if isinstance(info["dtype"], str) else None
            want = math.prod(info["shape"]) * per if per else end - start  # per 0: a dtype not in the table
            ok = (per is not None and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end
                  and end - start == want)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise header.problem("bad-tensor", name)
        if end > header.data_bytes:
            raise header.problem("data-overrun", name, end)
        end_max = max(end_max, end)
    if end_max != header.data_bytes:
        raise header.problem("trailing", end=end_max)


def encode_header(tensors: list[tuple[str, str, list[int]]], metadata: Optional[dict[str, str]] = None
                  ) -> tuple[bytes, int]:
    """The length prefix and JSON header of a safetensors file whose tensors ``(name, dtype,
    shape)`` follow it back to back in this order, and the bytes of data they take. The header
    is padded with spaces to a multiple of 8 bytes, as safetensors' own writer does, so every
    tensor's data stays aligned when the file is memory-mapped."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in tensors:
        end = offset + math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(PREFIX_BYTES, "little") + text, offset
