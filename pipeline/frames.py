"""Frames: labelled structures (energy, forces, stress) as rows of :data:`pipeline.schema.FRAMES_SCHEMA`.

``frame_row`` validates and builds one row; ``frames_table`` turns rows into an Arrow table; ``row_to_atoms``
gives back an ASE ``Atoms`` with a ``SinglePointCalculator`` holding the labels.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from pipeline.schema import FRAMES_SCHEMA

MAX_Z = 118


class RecordError(ValueError):
    """A record that cannot be imported; the message names the problem (the caller adds the record id)."""


def _finite(name: str, arr: np.ndarray) -> None:
    if not np.all(np.isfinite(arr)):
        raise RecordError(f"{name} contains NaN or inf")


def normalize_fidelity(fidelity: str) -> str:
    fid = str(fidelity).strip().lower()
    if not fid:
        raise RecordError("empty fidelity")
    return fid


def frame_row(
    *,
    frame_id: str,
    source: str,
    fidelity: str,
    numbers: Iterable[int],
    positions: Any,
    cell: Any,
    pbc: Any = (True, True, True),
    energy: float | None = None,
    forces: Any = None,
    stress: Any = None,
    magmoms: Any = None,
    material_id: str | None = None,
    task_id: str | None = None,
    run_type: str | None = None,
    calc_type: str | None = None,
    ionic_step: int | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate one labelled structure and return it as a schema row.

    ``stress`` must already be in eV/Angstrom^3 with the ASE sign (3x3 or Voigt 6-vector xx yy zz yz xz xy).
    Raises :class:`RecordError` for missing or non-finite values, unknown elements, bad shapes or a
    degenerate periodic cell.
    """
    z = np.asarray(list(numbers), dtype=np.int64)
    if z.ndim != 1 or z.size == 0:
        raise RecordError("no atoms")
    if z.min() < 1 or z.max() > MAX_Z:
        raise RecordError(f"unknown element with atomic number {int(z.min() if z.min() < 1 else z.max())}")
    n = z.size
    pos = np.asarray(positions, dtype=float)
    if pos.shape != (n, 3):
        raise RecordError(f"positions shape {pos.shape}, expected ({n}, 3)")
    _finite("positions", pos)
    lat = np.asarray(cell, dtype=float).reshape(3, 3) if cell is not None else np.zeros((3, 3))
    _finite("cell", lat)
    pbc_arr = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    if pbc_arr.any():
        vol = abs(np.linalg.det(lat))
        if vol < 1e-6:
            raise RecordError(f"periodic cell with zero volume ({vol:.3g} A^3)")
    e = None
    if energy is not None:
        e = float(energy)
        if not np.isfinite(e):
            raise RecordError("energy is NaN or inf")
    f = None
    if forces is not None:
        f = np.asarray(forces, dtype=float)
        if f.shape != (n, 3):
            raise RecordError(f"forces shape {f.shape}, expected ({n}, 3)")
        _finite("forces", f)
    s = None
    if stress is not None:
        s = np.asarray(stress, dtype=float)
        if s.shape == (6,):
            xx, yy, zz, yz, xz, xy = s
            s = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
        if s.shape != (3, 3):
            raise RecordError(f"stress shape {s.shape}, expected (3, 3) or (6,)")
        _finite("stress", s)
    m = None
    if magmoms is not None:
        m = np.asarray(magmoms, dtype=float).reshape(-1)
        if m.size != n:
            m = None  # non-collinear or inconsistent: drop, it is not a training label
        elif not np.all(np.isfinite(m)):
            m = None
    if e is None and f is None and s is None:
        raise RecordError("no labels (energy, forces and stress all missing)")
    return {
        "frame_id": str(frame_id),
        "material_id": None if material_id is None else str(material_id),
        "task_id": None if task_id is None else str(task_id),
        "source": str(source),
        "fidelity": normalize_fidelity(fidelity),
        "numbers": z.astype(np.int32).tolist(),
        "positions": pos.tolist(),
        "cell": lat.tolist(),
        "pbc": pbc_arr.tolist(),
        "energy": e,
        "forces": None if f is None else f.tolist(),
        "stress": None if s is None else s.tolist(),
        "has_energy": e is not None,
        "has_forces": f is not None,
        "has_stress": s is not None,
        "magmoms": None if m is None else m.tolist(),
        "run_type": run_type,
        "calc_type": calc_type,
        "ionic_step": None if ionic_step is None else int(ionic_step),
        "meta": json.dumps(dict(meta), sort_keys=True, default=str) if meta else None,
    }


def frames_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Arrow table of frame rows (schema-checked)."""
    return pa.Table.from_pylist(list(rows), schema=FRAMES_SCHEMA)


def atoms_to_frame_row(atoms: Atoms, **kwargs: Any) -> dict[str, Any]:
    """Row from an ASE ``Atoms``: labels taken from its calculator unless given in ``kwargs``."""
    calc = atoms.calc
    results = dict(getattr(calc, "results", {}) or {})
    kwargs.setdefault("energy", results.get("energy"))
    kwargs.setdefault("forces", results.get("forces"))
    kwargs.setdefault("stress", results.get("stress"))
    if "magmoms" not in kwargs:
        kwargs["magmoms"] = results.get("magmoms")
    return frame_row(
        numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell.array, pbc=atoms.pbc, **kwargs
    )


def row_to_atoms(row: Mapping[str, Any]) -> Atoms:
    """ASE ``Atoms`` of a frame row, labels attached through a ``SinglePointCalculator``; row fields in info."""
    atoms = Atoms(
        numbers=row["numbers"], positions=np.asarray(row["positions"]), cell=np.asarray(row["cell"]),
        pbc=row["pbc"],
    )
    results: dict[str, Any] = {}
    if row.get("energy") is not None:
        results["energy"] = row["energy"]
        results["free_energy"] = row["energy"]
    if row.get("forces") is not None:
        results["forces"] = np.asarray(row["forces"])
    if row.get("stress") is not None:
        s = np.asarray(row["stress"])
        results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    for key in ("frame_id", "material_id", "task_id", "source", "fidelity", "run_type", "calc_type", "ionic_step"):
        if row.get(key) is not None:
            atoms.info[key] = row[key]
    return atoms
