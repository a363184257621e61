"""E_hull of predicted energies against two hulls, both reported, never mixed up:

* ``dft_hull``   - the DFT reference hull of the same fidelity (reference phases at their DFT energies);
* ``model_hull`` - the all-model hull: the same reference phases with energies re-computed by the model, so that
  candidate and reference share one energy scale (systematic model errors cancel).

Energies are RAW total energies (eV) of the whole cell as the model (or a DFT code) gives them; the corrections
of the thermo type (MP2020 for the GGA scales) are applied here, the same way to candidates and references.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pymatgen.core import Composition, Structure
from pymatgen.core.entries import ComputedEntry, ComputedStructureEntry

from pipeline.frames import RecordError
from pipeline.hull.phase_diagram import ReferenceHull, chemsys_of, decomposition_json, phase_diagram
from pipeline.hull.thermo import GGA_GGA_U_R2SCAN, correct_like_reference

HULL_DFT = "dft_hull"
HULL_MODEL = "model_hull"


def prediction_entry(
    candidate_id: str,
    structure: Structure | Composition | str,
    *,
    energy: float | None = None,
    energy_per_atom: float | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> ComputedEntry:
    """Entry of one predicted raw energy (give the total ``energy`` or ``energy_per_atom``, in eV)."""
    if (energy is None) == (energy_per_atom is None):
        raise RecordError(f"{candidate_id}: give exactly one of energy and energy_per_atom")
    if isinstance(structure, Structure):
        n_atoms = len(structure)
    else:
        structure = Composition(structure)
        n_atoms = structure.num_atoms
    total = float(energy) if energy is not None else float(energy_per_atom) * n_atoms
    if not math.isfinite(total):
        raise RecordError(f"{candidate_id}: energy is NaN or inf")
    kw = {"parameters": dict(parameters or {}), "entry_id": str(candidate_id)}
    if isinstance(structure, Structure):
        return ComputedStructureEntry(structure, total, **kw)
    return ComputedEntry(structure, total, **kw)


def with_raw_energy(entry: ComputedEntry, energy: float) -> ComputedEntry:
    """Copy of ``entry`` (same cell, parameters and energy adjustments) with another raw total energy."""
    kw = {"energy_adjustments": copy.deepcopy(entry.energy_adjustments), "parameters": dict(entry.parameters or {}),
          "data": dict(entry.data or {}), "entry_id": entry.entry_id}
    if isinstance(entry, ComputedStructureEntry):
        return ComputedStructureEntry(entry.structure, energy, **kw)
    return ComputedEntry(entry.composition, energy, **kw)


def model_reference_hull(reference: ReferenceHull, model_energies: Mapping[str, float]) -> ReferenceHull:
    """The all-model hull: reference entries with their raw energy replaced by the model's (eV, whole cell).

    ``model_energies`` maps reference entry_id -> model raw total energy of that entry's cell. Entries without
    a model energy are left out (give at least every stable phase and each element). The thermo type's
    corrections are kept per entry: MP2020 corrections depend on composition, oxidation state and U, not on the
    energy. The mixing scheme's r2SCAN shifts depend on DFT energies, so GGA_GGA+U_R2SCAN has no model hull.
    """
    if reference.thermo_type == GGA_GGA_U_R2SCAN:
        raise RecordError("no all-model hull for GGA_GGA+U_R2SCAN: its corrections depend on DFT energies")
    unknown = set(model_energies) - {str(e.entry_id) for e in reference.entries}
    if unknown:
        raise RecordError(f"model energies for entries not in the reference hull: {sorted(unknown)[:5]}")
    entries = []
    for e in reference.entries:
        if str(e.entry_id) in model_energies:
            entries.append(with_raw_energy(e, float(model_energies[str(e.entry_id)])))
    have = {el.symbol for e in entries if e.composition.is_element for el in e.composition.elements}
    missing = sorted(set(reference.elements) - have)
    if missing:
        raise RecordError(f"all-model hull has no elemental reference for {missing}")
    return ReferenceHull(reference.thermo_type, reference.fidelity, entries, phase_diagram(entries), [])


@dataclass
class HullPoint:
    """E_hull of one candidate against one hull."""

    e_above_hull: float | None  # eV/atom, negative = below the hull
    decomposition: str | None  # JSON {reference entry_id: fraction}


def _point(hull: ReferenceHull | None, entry: ComputedEntry) -> HullPoint:
    if hull is None:
        return HullPoint(None, None)
    decomp, e_hull = hull.decomposition_and_e_above_hull(entry)
    return HullPoint(e_hull, decomposition_json(decomp))


def e_above_hull(
    predictions: Iterable[ComputedEntry],
    reference: ReferenceHull,
    *,
    model_energies: Mapping[str, float] | None = None,
    fidelity: str | None = None,
    check_potcar: bool = False,
) -> list[dict[str, Any]]:
    """E_hull of each predicted entry against the DFT reference hull and (if ``model_energies``) the all-model hull.

    Each prediction is an entry whose energy is the model's raw total energy (see :func:`prediction_entry`).
    ``fidelity``, when given, must be the reference's: energies of different fidelities are never compared.
    Returns one dict per prediction (a failure keeps its row with ``error`` set):
    ``candidate_id, formula, chemsys, fidelity, thermo_type, energy, energy_per_atom, correction,
    e_hull_pred_dft_hull, decomposition_dft_hull, e_hull_pred_model_hull, decomposition_model_hull, error``
    (the columns of :data:`pipeline.report.schema.REPORT_SCHEMA`).
    """
    if fidelity is not None and fidelity.lower() != reference.fidelity:
        raise RecordError(f"predictions at fidelity {fidelity!r} against a {reference.fidelity!r} reference hull")
    model_hull = None if model_energies is None else model_reference_hull(reference, model_energies)
    rows = []
    for entry in predictions:
        row: dict[str, Any] = {
            "candidate_id": str(entry.entry_id), "formula": entry.composition.reduced_formula,
            "chemsys": chemsys_of(entry), "fidelity": reference.fidelity, "thermo_type": reference.thermo_type,
            "energy": float(entry.uncorrected_energy), "energy_per_atom": None, "correction": None,
            "e_hull_pred_dft_hull": None, "decomposition_dft_hull": None, "e_hull_pred_model_hull": None, "decomposition_model_hull": None,
            "error": None,
        }
        try:
            corrected = correct_like_reference(entry, reference.thermo_type, check_potcar=check_potcar)
            row["energy_per_atom"] = float(corrected.energy_per_atom)
            row["correction"] = float(corrected.correction)
            dft = _point(reference, corrected)
            model = _point(model_hull, corrected)
        except Exception as exc:  # noqa: BLE001 - a failed candidate keeps its row with the error
            row["error"] = f"{type(exc).__name__}: {exc}"
        else:
            row.update({"e_hull_pred_dft_hull": dft.e_above_hull, "decomposition_dft_hull": dft.decomposition,
                        "e_hull_pred_model_hull": model.e_above_hull,
                        "decomposition_model_hull": model.decomposition})
        rows.append(row)
    return rows


def decomposition_ids(decomposition: str | None) -> list[str]:
    """Entry ids of a decomposition JSON (empty for None)."""
    return sorted(json.loads(decomposition)) if decomposition else []
