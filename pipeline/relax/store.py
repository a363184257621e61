"""Relaxations stored by content: a row is reused only when the same structure was relaxed by the same
checkpoint, at the same model fidelity, with the same settings.

``relax_key`` = sha256 of (structure hash, model id, model fidelity, result settings). The structure hash covers
atomic numbers, positions, cell and periodicity (rounded to 1e-6 A), so a different structure under an old file
name, or new ``fmax``/``steps``/fidelity, gets a new key and is recomputed. Rows are appended in batches
(one Parquet part per ``flush``), never one part per row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ase import Atoms

from pipeline.io import ParquetDataset
from pipeline.schema import KEYS, RELAXATIONS_SCHEMA

log = logging.getLogger(__name__)

__all__ = ["RelaxationStore", "relax_key", "structure_hash"]


def structure_hash(atoms: Atoms) -> str:
    """sha256 of numbers, positions, cell and pbc (lengths rounded to 1e-6 A)."""
    h = hashlib.sha256()
    h.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    for arr in (atoms.positions, atoms.cell.array):
        h.update((np.round(np.asarray(arr, dtype=np.float64), 6) + 0.0).tobytes())
    h.update(np.asarray(atoms.pbc, dtype=bool).tobytes())
    return h.hexdigest()


def relax_key(atoms: Atoms, model_id: str, model_fidelity: str, settings: Mapping[str, Any]) -> str:
    """Content key of one relaxation (see the module docstring)."""
    payload = {"structure": structure_hash(atoms), "model_id": model_id, "model_fidelity": model_fidelity,
               "settings": dict(settings)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class RelaxationStore:
    """A relaxations dataset (RELAXATIONS_SCHEMA) looked up by ``relax_key``; ``add`` buffers, ``flush`` writes.

    Parts written before the content key existed (no ``relax_key`` column) are renamed ``legacy-*.parquet`` and
    ignored, so they are recomputed rather than silently reused."""

    def __init__(self, path: str | Path, flush_every: int = 64) -> None:
        self.dataset = ParquetDataset(path, RELAXATIONS_SCHEMA, KEYS["relaxations"])
        self.flush_every = flush_every
        self._pending: list[dict[str, Any]] = []
        for part in self.dataset.parts():
            if "relax_key" not in pq.read_schema(part).names:
                target = part.with_name("legacy-" + part.name.removeprefix("part-"))
                part.rename(target)
                log.warning("relaxations in %s predate content keys: moved to %s, they will be recomputed",
                            part, target.name)
        self._by_key: dict[str, dict[str, Any]] = {}
        if self.dataset.exists():
            for row in self.dataset.read().to_pylist():
                self._by_key[row["relax_key"]] = row

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored row with this key (any candidate id), or None."""
        return self._by_key.get(key)

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self._by_key[row["relax_key"]] = row
            self._pending.append(row)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> int:
        """Write the buffered rows as one part; return how many were written."""
        if not self._pending:
            return 0
        n = self.dataset.append(pa.Table.from_pylist(self._pending, schema=RELAXATIONS_SCHEMA))
        self._pending = []
        return n
