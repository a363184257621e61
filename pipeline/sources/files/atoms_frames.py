"""Helpers shared by the importers that read ASE ``Atoms`` (extxyz, ASE db): ids, MPtrj metadata, units.

* :func:`content_frame_id`: a stable id from the frame's content, for records that carry no id of their own.
* :func:`mptrj_fields`: MPtrj snapshot id ``<task_id>-<calc_id>-<ionic_step>`` -> schema fields. Frames of
  MPtrj get the id ``mptrj:<snapshot id>`` whichever file they come from, so the same frame read from two
  files (e.g. the random and the highest-stress mattersim sets) is stored once.
* :func:`mp_run_type`: MP's GGA vs GGA+U rule (MPRelaxSet: +U when a U element meets O or F), because MPtrj
  frames do not say which of the two their task ran.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from pipeline.frames import RecordError, atoms_to_frame_row
from pipeline.sources.files.res import MP_HUBBARD_U

MPTRJ_PREFIX = "mptrj"

#: Unit strings that mean the schema's units (anything else is rejected, never silently converted).
ACCEPTED_UNITS = {
    "energy_unit": {"ev"},
    "forces_unit": {"ev/a", "ev/ang", "ev/angstrom", "ev/å"},
    "stress_unit": {"ev/a^3", "ev/a3", "ev/ang^3", "ev/angstrom^3", "ev/å^3", "ev/å3"},
}


def check_units(info: Mapping[str, Any]) -> None:
    """Raise :class:`RecordError` when an ``*_unit`` key names a unit other than eV, eV/A, eV/A^3."""
    for key, accepted in ACCEPTED_UNITS.items():
        if key in info and str(info[key]).strip().lower() not in accepted:
            raise RecordError(f"{key}={info[key]!r} is not supported (expected one of {sorted(accepted)})")


def content_frame_id(prefix: str, atoms: Atoms, energy: float | None) -> str:
    """``<prefix>:<16 hex>`` from numbers, positions, cell (rounded to 1e-6 A) and energy (1e-6 eV)."""
    h = hashlib.sha1()
    h.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    h.update(np.round(atoms.positions, 6).astype(np.float64).tobytes())
    h.update(np.round(atoms.cell.array, 6).astype(np.float64).tobytes())
    h.update(b"none" if energy is None else f"{float(energy):.6f}".encode())
    return f"{prefix}:{h.hexdigest()[:16]}"


def mptrj_fields(
    snapshot_id: str, material_id: str | None, numbers: Iterable[int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(schema fields, meta) of an MPtrj frame from its snapshot id ``<task_id>-<calc_id>-<ionic_step>``."""
    parts = str(snapshot_id).strip().rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise RecordError(f"MPtrj snapshot id {snapshot_id!r} is not '<task_id>-<calc_id>-<ionic_step>'")
    task_id, calc_id, step = parts
    fields = {
        "frame_id": f"{MPTRJ_PREFIX}:{snapshot_id}",
        "material_id": None if material_id is None else str(material_id),
        "task_id": task_id,
        "ionic_step": int(step),
        "run_type": mp_run_type(numbers),
    }
    return fields, {"calc_id": int(calc_id), "run_type_from": "mp-rules"}


def mp_run_type(numbers: Iterable[int]) -> str:
    """'GGA+U' if the composition has a U element (Co Cr Fe Mn Mo Ni V W) and O or F, else 'GGA' (MP rule)."""
    symbols = {chemical_symbols[int(z)] for z in numbers}
    return "GGA+U" if symbols & set(MP_HUBBARD_U) and symbols & {"O", "F"} else "GGA"


def scalar_meta(info: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON-friendly scalar entries of an info/data mapping (arrays and nested objects are left out)."""
    out: dict[str, Any] = {}
    skipped = set(skip)
    for key, value in info.items():
        if key in skipped:
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool | int | str) or (isinstance(value, float) and math.isfinite(value)):
            out[str(key)] = value
    return out


def labelled_atoms_row(atoms: Atoms, *, flip_stress: bool = False, **fields: Any) -> dict[str, Any]:
    """Frame row of an ``Atoms`` whose calculator holds the labels; ``flip_stress`` for VASP-sign files."""
    if atoms.calc is None:
        raise RecordError("no labels (no energy, forces or stress attached)")
    if flip_stress:
        stress = atoms.calc.results.get("stress")
        if stress is not None:
            fields["stress"] = -np.asarray(stress, dtype=float)
    return atoms_to_frame_row(atoms, **fields)
