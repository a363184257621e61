"""Thermodynamic entries as rows of :data:`pipeline.schema.ENTRIES_SCHEMA`, lossless to and from pymatgen.

``entry_to_row`` stores everything pymatgen needs to rebuild the same ``ComputedStructureEntry`` (structure,
uncorrected energy, energy adjustments, parameters, data, entry_id); ``row_to_entry`` rebuilds it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
from monty.json import MontyDecoder, MontyEncoder
from pymatgen.core import Element, Structure
from pymatgen.core.entries import ComputedEntry, ComputedStructureEntry

from pipeline.frames import RecordError
from pipeline.schema import ENTRIES_SCHEMA

#: MP run types -> fidelity names used across the project.
RUN_TYPE_FIDELITY = {
    "GGA": "pbe",
    "GGA+U": "pbe",
    "PBE": "pbe",
    "PBE+U": "pbe",
    "R2SCAN": "r2scan",
    "R2SCAN+U": "r2scan",
    "SCAN": "scan",
    "PBESOL": "pbesol",
}


def fidelity_from_run_type(run_type: str | None) -> str:
    """Map an MP run type (GGA, GGA+U, R2SCAN, r2SCAN...) to a fidelity name (pbe, r2scan...)."""
    if run_type is None:
        raise RecordError("run_type missing: cannot tell the fidelity")
    key = str(run_type).strip().upper()
    if key not in RUN_TYPE_FIDELITY:
        raise RecordError(f"unknown run_type {run_type!r}; known: {sorted(RUN_TYPE_FIDELITY)}")
    return RUN_TYPE_FIDELITY[key]


def normalize_run_type(run_type: str | None) -> str | None:
    """'r2SCAN' -> 'R2SCAN', 'gga+u' -> 'GGA+U' (MP spells them both ways)."""
    return None if run_type is None else str(run_type).strip().upper()


def _json(obj: Any) -> str | None:
    if obj is None:
        return None
    return json.dumps(obj, cls=MontyEncoder, sort_keys=True)


def entry_to_row(
    entry: ComputedEntry,
    *,
    source: str,
    thermo_type: str = "raw",
    fidelity: str | None = None,
    material_id: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate a pymatgen entry and return it as a schema row."""
    comp = entry.composition
    if comp.num_atoms <= 0:
        raise RecordError("empty composition")
    for el in comp.elements:
        # pymatgen parses unknown symbols as DummySpecies (with a made-up Z), so check the symbol itself
        if not Element.is_valid_symbol(getattr(el, "symbol", "")):
            raise RecordError(f"unknown element {el}")
    e0 = float(entry.uncorrected_energy)
    if not math.isfinite(e0):
        raise RecordError("uncorrected energy is NaN or inf")
    corr = float(entry.correction)
    if not math.isfinite(corr):
        raise RecordError("correction is NaN or inf")
    structure = getattr(entry, "structure", None)
    if structure is not None and structure.lattice.volume < 1e-6:
        raise RecordError("structure with zero volume")
    params = dict(entry.parameters or {})
    run_type = normalize_run_type(params.get("run_type"))
    if fidelity is None:
        fidelity = fidelity_from_run_type(run_type)
    data = dict(entry.data or {})
    entry_id = entry.entry_id
    mid = material_id or data.get("material_id")
    if mid is None and entry_id is not None and str(entry_id).startswith(("mp-", "mvc-")):
        parts = str(entry_id).split("-")
        mid = "-".join(parts[:2])
    if entry_id is None:
        if mid is None:
            raise RecordError("entry has neither entry_id nor material_id")
        entry_id = f"{mid}-{run_type or fidelity}"
    return {
        "entry_id": str(entry_id),
        "thermo_type": str(thermo_type),
        "material_id": None if mid is None else str(mid),
        "source": source,
        "fidelity": fidelity.lower(),
        "run_type": run_type,
        "formula": comp.reduced_formula,
        "chemsys": comp.chemical_system,
        "composition": json.dumps({el.symbol: amt for el, amt in comp.items()}, sort_keys=True),
        "nsites": int(len(structure) if structure is not None else round(comp.num_atoms)),
        "structure": None if structure is None else json.dumps(structure.as_dict()),
        "uncorrected_energy": e0,
        "correction": corr,
        "energy": float(entry.energy),
        "energy_per_atom": float(entry.energy_per_atom),
        "energy_adjustments": _json([a.as_dict() for a in entry.energy_adjustments]),
        "parameters": _json(params),
        "data": _json(data),
        "entry_class": type(entry).__name__,
        "meta": json.dumps(dict(meta), sort_keys=True, default=str) if meta else None,
    }


def row_to_entry(row: Mapping[str, Any]) -> ComputedEntry:
    """Rebuild the pymatgen entry of a row (ComputedStructureEntry when a structure is stored)."""
    dec = MontyDecoder()
    adjustments = dec.process_decoded(json.loads(row["energy_adjustments"])) if row.get("energy_adjustments") else []
    parameters = dec.process_decoded(json.loads(row["parameters"])) if row.get("parameters") else {}
    data = dec.process_decoded(json.loads(row["data"])) if row.get("data") else {}
    common = {
        "energy": row["uncorrected_energy"], "energy_adjustments": adjustments or None,
        "parameters": parameters, "data": data, "entry_id": row["entry_id"],
    }
    if not adjustments and row.get("correction"):
        common["correction"] = row["correction"]
    if row.get("structure"):
        structure = Structure.from_dict(json.loads(row["structure"]))
        return ComputedStructureEntry(structure, **common)
    return ComputedEntry(json.loads(row["composition"]), **common)


def entries_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Arrow table of entry rows (schema-checked)."""
    return pa.Table.from_pylist(list(rows), schema=ENTRIES_SCHEMA)


def table_to_entries(table: pa.Table) -> list[ComputedEntry]:
    """All rows of an entries table as pymatgen entries."""
    return [row_to_entry(r) for r in table.to_pylist()]
