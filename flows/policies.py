"""Prefect task policies: cache keys on input CONTENT (file hashes) plus settings, and a retry condition that
retries only errors no other layer handles.

Cache: Prefect's INPUTS policy hashes parameter values, i.e. paths, so an edited file would hit a stale cache;
``content_cache_key(...)`` hashes the bytes of the files (or every file under the folders) named by the given
parameters, and the values of all other parameters. Unchanged steps are skipped, changed ones recomputed.

Retries, one layer per error: the MP client already retries transient HTTP errors itself (and raises
RetriesExhausted when they persist), auth and bad input can never succeed on a retry; Prefect retries anything
else (a worker's disk or network hiccup outside the MP client).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flows.steps import WorkerConfigError
from pipeline.sources.mp.mp_client import MPAuthError, RetriesExhausted

#: Never retried by Prefect: auth (the key is wrong), bad input (same input, same error), and transient errors
#: the MP client has already retried.
NOT_RETRIED: tuple[type[BaseException], ...] = (
    MPAuthError, RetriesExhausted, WorkerConfigError, ValueError, KeyError, TypeError, FileNotFoundError,
    NotADirectoryError, IsADirectoryError, PermissionError,
)


def hash_path(path: str | Path, digest: Any | None = None) -> str:
    """sha256 over a file's bytes, or over every file under a folder (relative names + bytes, sorted)."""
    h = digest or hashlib.sha256()
    path = Path(path)
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(child.relative_to(path)).encode())
            hash_path(child, h)
    elif path.is_file():
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    else:
        h.update(b"<missing>")
    return h.hexdigest()


def content_cache_key(*path_params: str) -> Callable[[Any, Mapping[str, Any]], str]:
    """A ``cache_key_fn`` hashing the content of the path parameters ``path_params`` (a path or a list of
    paths; None allowed) and the JSON of every other parameter, plus the task's name."""

    def key(context: Any, parameters: Mapping[str, Any]) -> str:
        h = hashlib.sha256()
        task = getattr(getattr(context, "task", None), "name", "")
        h.update(task.encode())
        for name in sorted(parameters):
            value = parameters[name]
            h.update(name.encode())
            if name in path_params and value is not None:
                for p in [value] if isinstance(value, str | Path) else value:
                    h.update(hash_path(p).encode())
            else:
                h.update(json.dumps(value, sort_keys=True, default=str).encode())
        return h.hexdigest()

    return key


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn``: retry unless the error is auth, bad input, or already retried by the MP client."""
    try:
        exc = state.result(raise_on_failure=False)
    except BaseException as raised:  # noqa: BLE001 - some states re-raise instead of returning the error
        exc = raised
    return isinstance(exc, BaseException) and not isinstance(exc, NOT_RETRIED)
