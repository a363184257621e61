"""Parquet reading/writing: single files written atomically, and appendable datasets deduplicated by key.

A *dataset* is a folder of ``part-*.parquet`` files sharing one schema. ``append`` writes only rows whose key is
not stored yet (and the first of duplicates inside the batch), each part atomically, so an interrupted job leaves
either a whole part or none and a re-run skips what is stored.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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

    def append(self, table: pa.Table) -> int:
        """Append the rows whose key is new; return how many were written."""
        if self.schema is not None:
            table = table.select(self.schema.names).cast(self.schema)
        if self.key:
            table = dedup(table, self.key, exclude=self.keys())
        if table.num_rows == 0:
            return 0
        self.path.mkdir(parents=True, exist_ok=True)
        n = len(self.parts())
        write_table_atomic(table, self.path / f"part-{n:05d}-{uuid.uuid4().hex[:8]}.parquet")
        return table.num_rows

    def compact(self) -> Path:
        """Rewrite all parts as a single part (atomic per file; old parts removed after the new one lands)."""
        old = self.parts()
        if len(old) <= 1:
            return old[0] if old else self.path
        table = self.read()
        new = write_table_atomic(table, self.path / f"part-{0:05d}-{uuid.uuid4().hex[:8]}.parquet")
        for p in old:
            p.unlink()
        return new
