"""The export's error, and how it reports an input it cannot read: a file that does not parse
(:func:`_parsed`) and a safetensors file whose header is cut, garbled or disagrees with the
file (:func:`_read_safetensors_header`, on :mod:`loradrop_ds.safetensors_header`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..safetensors_header import HeaderProblem, check_tensors, read_header


class ExportError(ValueError):
    """An export that cannot be made as asked; the message says why and how to fix it."""


def _parsed(path: Path, read):
    """``read(path)``, with a file that does not parse reported as an ExportError naming it."""
    try:
        return read(path)
    except ExportError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError) as e:
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors; a JSON of the wrong
        # shape gives TypeError/KeyError/AttributeError in the dataclass it is read into.
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        mark = getattr(e, "problem_mark", None)
        if isinstance(e, yaml.MarkedYAMLError) and mark is not None:
            what = f"{e.problem} at line {mark.line + 1}, column {mark.column + 1}"
        if isinstance(e, UnicodeDecodeError):
            line = e.object[:e.start].count(b"\n") + 1
            what = f"a byte that is not UTF-8 at line {line}"
        raise ExportError(f"{path}: does not parse ({type(e).__name__}: {what}); the file is corrupt or was "
                          "edited by hand") from None


def _yaml_mapping(path: Path) -> dict:
    data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    if not isinstance(data, dict):
        raise ExportError(f"{path}: a YAML mapping of settings was expected, found {type(data).__name__}")
    return data


def _read_json(path: Path) -> Any:
    """The file's JSON, decoded from bytes (a byte that is not UTF-8 is found by line, see _parsed)."""
    return json.loads(path.read_bytes().decode("utf-8"))


def _json_object(path: Path, read: Callable[[Path], Any] = _read_json) -> dict:
    """``read(path)`` (by default the file's JSON), which must be a JSON object."""
    data = read(path)
    if not isinstance(data, dict):
        raise ExportError(f"{path}: a JSON object was expected, found {type(data).__name__}")
    return data


def _read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON): names,
    dtypes, shapes and byte ranges, without reading any tensor; checked against the file's size."""
    try:
        header = read_header(path)
        check_tensors(header)
    except HeaderProblem as p:
        raise ExportError(_header_message(p)) from None
    return header.tensors


def _header_message(p: HeaderProblem) -> str:
    if p.kind in ("short", "header-overrun"):
        return (f"{p.path}: truncated or not a safetensors file ({p.size} bytes, header says {p.length} "
                "bytes of metadata)")
    if p.kind == "not-json":
        return f"{p.path}: corrupt safetensors header (not a JSON object)"
    if p.kind == "bad-tensor":
        return f"{p.path}: corrupt safetensors header: tensor {p.tensor} has inconsistent dtype, shape or offsets"
    if p.kind == "data-overrun":
        return (f"{p.path}: truncated: tensor {p.tensor} ends at byte {p.end} of the data, the file holds "
                f"{p.data_bytes} ({p.size} bytes in all); download or copy it again")
    return f"{p.path}: {p.data_bytes - p.end} bytes more than its tensors; the file is corrupt"
