"""Helpers shared by the importers: (gzipped) JSON reading, the one-reject result of a bad file, required
fields and pymatgen structures of JSON records."""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from pipeline.frames import RecordError
from pipeline.sources.base import ImportResult


def read_bytes(path: str | Path) -> bytes:
    """Bytes of a file, gunzipped when it starts with the gzip magic number."""
    raw = Path(path).read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def read_json(path: str | Path, expect: type | tuple[type, ...] | None = None) -> Any:
    """Parsed JSON of a plain or gzipped file; :class:`RecordError` if the top level is not of type ``expect``."""
    data = json.loads(read_bytes(path))
    if expect is not None and not isinstance(data, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        raise RecordError(f"expected a JSON {names} at the top level, got {type(data).__name__}")
    return data


def failed_file(source: str, path: str | Path, what: str, error: BaseException) -> ImportResult:
    """An import result holding one reject, ``unreadable <what>: <error>``, for a whole file."""
    result = ImportResult(source)
    result.reject(Path(path).name, RecordError(f"unreadable {what}: {type(error).__name__}: {error}"))
    return result


def require(record: Mapping[str, Any], *keys: str) -> None:
    """:class:`RecordError` naming every key of ``keys`` that is missing or null in ``record``."""
    missing = [k for k in keys if record.get(k) is None]
    if missing:
        raise RecordError(f"missing field(s): {', '.join(missing)}")


def record_structure(record: Mapping[str, Any], key: str = "structure") -> Structure:
    """The pymatgen ``Structure`` stored as a dict under ``key``; :class:`RecordError` if absent, broken or flat."""
    require(record, key)
    try:
        structure = Structure.from_dict(record[key])
    except Exception as exc:  # pymatgen raises several types for broken dicts
        raise RecordError(f"bad structure: {type(exc).__name__}: {exc}") from exc
    if structure.lattice.volume < 1e-6:
        raise RecordError("structure with zero volume")
    return structure
