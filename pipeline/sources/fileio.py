"""Small file helpers shared by the importers: (gzipped) JSON reading and the one-reject result of a bad file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

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
