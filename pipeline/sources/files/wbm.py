"""WBM structures with MP-compatible PBE energies (matcalc's ``wbm-*.json.gz`` benchmark files) -> entry rows.

Each record: ``material_id`` (``wbm-<step>-<n>``), ``structure`` (pymatgen dict), ``energy`` (raw total, eV),
``corrected_energy`` (after MP2020), formation energies per atom. The file gives the correction only as a
total, so the entry is rebuilt the way MP builds its own: run type by MP's rule (GGA+U when a U element meets O
or F, :func:`pipeline.sources.files.atoms_frames.mp_run_type`) with MP's U values, then pymatgen's
``MaterialsProject2020Compatibility`` (``check_potcar=False``: the file names no POTCARs). The resulting
adjustments must reproduce the file's ``corrected_energy`` within 0.1 meV per cell, else the record is rejected,
so that every imported entry carries the corrections the rest of the pipeline would compute. Rows are
``thermo_type="GGA_GGA+U"``, fidelity ``pbe``.

Measured on ``wbm-random-pbe52-equilibrium-2025.1.json.gz``: 970 of 972 records reproduce the file's corrected
energy exactly. The two others are silicides with Cu (wbm-3-68551 Eu3(Cu2Si)2, wbm-2-45522 ErCuSi2): the file
applied MP2020's Si anion correction (+0.071 eV per Si), current pymatgen does not (Cu and Si have the same
Pauling electronegativity, 1.90, so the anion guess differs); they are rejected with the gap in the message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pymatgen.analysis.compatibility import MaterialsProject2020Compatibility
from pymatgen.core.entries import ComputedStructureEntry

from pipeline.entries import entry_to_row
from pipeline.frames import RecordError
from pipeline.sources.base import ImportResult, collect
from pipeline.sources.common import failed_file, read_json, record_structure, require
from pipeline.sources.files.atoms_frames import mp_run_type
from pipeline.sources.files.res import MP_HUBBARD_U

SOURCE = "wbm"

#: largest |our MP2020 energy - the file's corrected_energy| accepted (eV per cell)
TOLERANCE = 1e-4

_DATA_KEYS = (
    "formula",
    "formation_energy_per_atom",
    "corrected_formation_energy_per_atom",
    "corrected_energy",
)


def record_to_entry(
    record: Mapping[str, Any], compat: MaterialsProject2020Compatibility
) -> ComputedStructureEntry:
    """One WBM record -> MP2020-corrected ComputedStructureEntry, checked against ``corrected_energy``."""
    require(record, "material_id", "structure", "energy", "corrected_energy")
    energy = float(record["energy"])
    if not math.isfinite(energy):
        raise RecordError("energy is NaN or inf")
    structure = record_structure(record)
    run_type = mp_run_type(structure.atomic_numbers)
    elements = {el.symbol for el in structure.composition.elements}
    hubbards = {el: u for el, u in MP_HUBBARD_U.items() if el in elements} if run_type == "GGA+U" else {}
    material_id = str(record["material_id"])
    data = {"material_id": material_id, **{k: record[k] for k in _DATA_KEYS if k in record}}
    entry = ComputedStructureEntry(
        structure,
        energy,
        parameters={"run_type": run_type, "hubbards": hubbards, "is_hubbard": bool(hubbards)},
        data=data,
        entry_id=material_id,
    )
    corrected = compat.process_entry(entry, clean=True, on_error="raise")
    if corrected is None:
        raise RecordError("MP2020 compatibility rejected the entry")
    gap = corrected.energy - float(record["corrected_energy"])
    if not abs(gap) <= TOLERANCE:
        raise RecordError(f"MP2020 energy differs from the file's corrected_energy by {gap:.4f} eV")
    return corrected


def import_wbm(path: str | Path, *, limit: int | None = None) -> ImportResult:
    """Entry rows of every WBM record of a JSON(.gz) list (``limit``: the first records only)."""
    path = Path(path)
    try:
        data = read_json(path, expect=list)
    except Exception as exc:  # noqa: BLE001 - an unreadable file is one reject
        return failed_file(SOURCE, path, "WBM file", exc)
    compat = MaterialsProject2020Compatibility(check_potcar=False)
    records = [
        (f"{path.name}:{r.get('material_id', i) if isinstance(r, Mapping) else i}", r)
        for i, r in enumerate(data)
    ][:limit]

    def convert(record_id: str, record: Any) -> list[dict[str, Any]]:
        if not isinstance(record, Mapping):
            raise RecordError(f"record is a {type(record).__name__}, not a mapping")
        entry = record_to_entry(record, compat)
        return [entry_to_row(entry, source=SOURCE, thermo_type="GGA_GGA+U", meta={"file": path.name})]

    return collect(SOURCE, records, convert)
