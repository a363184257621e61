"""Parquet reading/writing: single files written atomically, and appendable datasets deduplicated by key.

A *dataset* is a folder of ``part-*.parquet`` files sharing one schema. ``append`` writes only rows whose key is
not stored yet (and the first of duplicates inside the batch), each part atomically, so an interrupted job leaves
either a whole part or none and a re-run skips what is stored. Writers hold the folder's lock file
(``.lock``, :mod:`filelock`) from reading the stored keys to renaming the new part, so two processes appending
to one dataset at once never store a row twice; leftover ``.*.tmp`` files of a killed writer are removed when
the next writer takes the lock.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from filelock import FileLock

from pipeline.io.atomic import atomic_path


def write_table_atomic(table: pa.Table, path: str | os.PathLike[str], compression: str = "zstd") -> Path:
    """Write ``table`` to one Parquet file atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression)
    return Path(path)


def read_table(path: str | os.PathLike[str], schema: pa.Schema | None = None) -> pa.Table:
    """Read a Parquet file or dataset folder; cast to ``schema`` when given."""
    path = Path(path)
    if path.is_dir():
        return ParquetDataset(path, schema).read()
    table = pq.read_table(path)
    return table.cast(schema) if schema is not None else table


def _key_strings(table: pa.Table, key: Sequence[str]) -> list[str]:
    cols = [table.column(k).cast(pa.string()).fill_null("\x00null").to_pylist() for k in key]
    return ["\x1f".join(parts) for parts in zip(*cols, strict=True)] if cols else []


def dedup(table: pa.Table, key: Sequence[str], exclude: Iterable[str] = ()) -> pa.Table:
    """Keep the first row of each key, dropping keys in ``exclude``."""
    seen = set(exclude)
    keep = []
    for i, k in enumerate(_key_strings(table, key)):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return table.take(pa.array(keep, pa.int64())) if len(keep) != table.num_rows else table


def _content(row: dict) -> str:
    return json.dumps(row, sort_keys=True, default=str)


def remove_stale_tmp(folder: str | os.PathLike[str], older_than_s: float = 0.0) -> list[Path]:
    """Remove ``.*.tmp`` files left in ``folder`` by writers killed before their rename (see
    :func:`pipeline.io.atomic_path`); only call it while holding the folder's lock, or with ``older_than_s``
    larger than any write can take. Returns the removed paths."""
    folder = Path(folder)
    removed = []
    now = time.time()
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
        try:
            if now - tmp.stat().st_mtime >= older_than_s:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # another cleaner got there first
            continue
    return removed


class ParquetDataset:
    """A folder of Parquet parts with a fixed schema and a primary key."""

    def __init__(self, path: str | os.PathLike[str], schema: pa.Schema | None, key: Sequence[str] = ()):
        self.path = Path(path)
        self.schema = schema
        self.key = tuple(key)

    def parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet")) if self.path.is_dir() else []

    def exists(self) -> bool:
        return bool(self.parts())

    def keys(self) -> set[str]:
        """Keys of all stored rows (reads only the key columns)."""
        out: set[str] = set()
        for part in self.parts():
            out.update(_key_strings(pq.read_table(part, columns=list(self.key)), self.key))
        return out

    def read(self, columns: list[str] | None = None, filter_expr: pc.Expression | None = None) -> pa.Table:
        parts = self.parts()
        if not parts:
            if self.schema is None:
                raise FileNotFoundError(f"no Parquet parts in {self.path}")
            empty = self.schema.empty_table()
            return empty.select(columns) if columns else empty
        tables = [pq.read_table(p, columns=columns) for p in parts]
        if self.schema is not None:
            target = pa.schema([self.schema.field(c) for c in columns]) if columns else self.schema
            tables = [t.cast(target) for t in tables]
        table = pa.concat_tables(tables)
        if self.key and len(parts) > 1 and (columns is None or set(self.key) <= set(columns)):
            table = dedup(table, self.key)  # a compaction cut short may leave a row in two parts
        return table.filter(filter_expr) if filter_expr is not None else table

    def lock(self, timeout: float = 600.0) -> FileLock:
        """The dataset's writer lock (a context manager); ``timeout`` s to wait for another writer."""
        self.path.mkdir(parents=True, exist_ok=True)
        return FileLock(self.path / ".lock", timeout=timeout)

    def append(self, table: pa.Table) -> int:
        """Append the rows whose key is new; return how many were written."""
        return self.append_checked(table)[0]

    def append_checked(self, table: pa.Table) -> tuple[int, list[str]]:
        """Append the rows whose key is new, under the lock; return (rows written, keys of rows that were NOT
        written because a row with the same key but different content is stored or came earlier in ``table``).
        Rows identical to a stored one are skipped silently (a re-run)."""
        if self.schema is not None:
            table = table.select(self.schema.names).cast(self.schema)
        with self.lock():
            remove_stale_tmp(self.path)
            conflicts = self._conflicts(table) if self.key else []
            if self.key:
                table = dedup(table, self.key, exclude=self.keys())
            if table.num_rows == 0:
                return 0, conflicts
            n = len(self.parts())
            write_table_atomic(table, self.path / f"part-{n:05d}-{uuid.uuid4().hex[:8]}.parquet")
            return table.num_rows, conflicts

    def _conflicts(self, table: pa.Table) -> list[str]:
        """Keys of ``table`` rows whose key is already taken (stored, or earlier in the batch) by other content."""
        keys = _key_strings(table, self.key)
        first: dict[str, str] = {}
        out: list[str] = []
        rows = table.to_pylist()
        wanted = set(keys)
        stored = self.keys() & wanted
        if stored:
            col = self.key[0]
            values = pa.array(sorted({r[col] for r, k in zip(rows, keys, strict=True) if k in stored}),
                              table.schema.field(col).type)
            old = self.read(filter_expr=pc.field(col).isin(values))
            for k, r in zip(_key_strings(old, self.key), old.to_pylist(), strict=True):
                first.setdefault(k, _content(r))
        for k, r in zip(keys, rows, strict=True):
            content = _content(r)
            if first.setdefault(k, content) != content:
                out.append(k.replace("\x1f", "/"))
        return out

    def compact(self) -> Path:
        """Rewrite all parts as a single part (atomic per file; old parts removed after the new one lands)."""
        with self.lock():
            old = self.parts()
            if len(old) <= 1:
                return old[0] if old else self.path
            table = self.read()
            new = write_table_atomic(table, self.path / f"part-{0:05d}-{uuid.uuid4().hex[:8]}.parquet")
            for p in old:
                p.unlink()
            return new
