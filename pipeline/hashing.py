"""Content hashes: of one structure (so that every fidelity of a structure can be grouped without a
``material_id``) and of a frames table + config (the resume key and the training-data hash of a checkpoint).

Written by hand because no field library offers either: pymatgen's ``StructureMatcher`` groups *similar*
structures (symmetry-aware, tolerant, O(n^2) comparisons), whereas here the same structure computed at two
fidelities is byte-identical up to rounding, and a stable digest is what a resume key needs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["config_hash", "frames_hash", "structure_hash"]

#: positions and cell are rounded to this many decimals (Angstrom) before hashing
DECIMALS = 4


def structure_hash(numbers: Iterable[int], positions: Any, cell: Any, pbc: Any = (True, True, True)) -> str:
    """Digest of a structure: species, cell and positions wrapped into the cell (periodic directions),
    rounded to 1e-4 A, atoms in a canonical order. Equal for the PBE and r2SCAN copies of one structure."""
    z = np.asarray(list(numbers), dtype=np.int64)
    pos = np.asarray(positions, dtype=float).reshape(-1, 3)
    lat = np.asarray(cell, dtype=float).reshape(3, 3)
    periodic = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    if periodic.any() and abs(np.linalg.det(lat)) > 1e-8:
        frac = np.linalg.solve(lat.T, pos.T).T
        frac[:, periodic] = np.mod(np.round(frac[:, periodic], 6), 1.0)
        frac[:, periodic] = np.where(np.isclose(frac[:, periodic], 1.0, atol=1e-6), 0.0, frac[:, periodic])
        pos = frac @ lat
    table = np.round(np.column_stack([z, pos]), DECIMALS) + 0.0  # + 0.0: -0.0 -> 0.0
    table = table[np.lexsort(table.T[::-1])]
    h = hashlib.sha256()
    for part in (table, np.round(lat, DECIMALS) + 0.0, periodic.astype(np.int8)):
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()[:16]


def frames_hash(frames: pa.Table) -> str:
    """Digest of a frames table's content (rows in frame_id order, chunking ignored): same data, same hash."""
    order = pa.compute.sort_indices(frames, sort_keys=[("frame_id", "ascending")])
    table = frames.take(order).combine_chunks()
    h = hashlib.sha256()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema.remove_metadata()) as writer:
        writer.write_table(table.replace_schema_metadata(None))
    h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()[:16]


def config_hash(config: Mapping[str, Any]) -> str:
    """Digest of a JSON-serialisable config (key order ignored)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
