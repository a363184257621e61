"""E_hull of predicted energies against two hulls, both reported, never mixed up:

* ``dft_hull``   - the DFT reference hull of the same fidelity (reference phases at their DFT energies);
* ``model_hull`` - the all-model hull: the same reference phases with energies re-computed by the model, so that
  candidate and reference share one energy scale (systematic model errors cancel).

Energies are RAW total energies (eV) of the whole cell as the model (or a DFT code) gives them; the corrections
of the thermo type (MP2020 for the GGA scales) are applied here, the same way to candidates and references.

GGA_GGA+U_R2SCAN (pymatgen's mixing scheme): :func:`e_above_hull` places single-fidelity predictions (PBE, or
r2SCAN) on the mixed hull's scale; :func:`mixed_e_above_hull` takes both heads of a multi-fidelity model, and its
all-model hull re-runs the mixing scheme on the references' model energies (GGA entries at the PBE head, r2SCAN
entries at the r2SCAN head).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pymatgen.core import Composition, Structure
from pymatgen.core.entries import ComputedEntry, ComputedStructureEntry

from pipeline.frames import RecordError
from pipeline.hull.phase_diagram import ReferenceHull, chemsys_of, decomposition_json, phase_diagram
from pipeline.hull.thermo import (
    GGA_GGA_U_R2SCAN,
    correct_like_reference,
    mix,
    place_on_mixed_scale,
    uncorrected,
)

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
    energy. GGA_GGA+U_R2SCAN: the ids are those of the raw entries given to the mixing scheme
    (``reference.mixing.inputs``; GGA ones at the model's PBE head, r2SCAN ones at its r2SCAN head) and the
    mixing scheme is run again on the model energies, since its shifts depend on them.
    """
    mixed = reference.thermo_type == GGA_GGA_U_R2SCAN
    if mixed and reference.mixing is None:
        raise RecordError("a GGA_GGA+U_R2SCAN hull without its mixing state (build it with build_reference_hull)")
    pool = reference.mixing.inputs if mixed else reference.entries
    unknown = set(model_energies) - {str(e.entry_id) for e in pool}
    if unknown:
        raise RecordError(f"model energies for entries not in the reference hull: {sorted(unknown)[:5]}")
    entries = [with_raw_energy(e, float(model_energies[str(e.entry_id)])) for e in pool
               if str(e.entry_id) in model_energies]
    have = {el.symbol for e in entries if e.composition.is_element for el in e.composition.elements}
    missing = sorted(set(reference.elements) - have)
    if missing:
        raise RecordError(f"all-model hull has no elemental reference for {missing}")
    state = None
    if mixed:
        entries, state = mix(entries)
    return ReferenceHull(reference.thermo_type, reference.fidelity, entries, phase_diagram(entries), [], state)


@dataclass
class HullPoint:
    """E_hull of one candidate against one hull."""

    e_above_hull: float | None  # eV/atom, negative = below the hull
    decomposition: str | None  # JSON {reference entry_id: fraction}


def _point(hull: ReferenceHull | None, entry: ComputedEntry | None) -> HullPoint:
    if hull is None or entry is None:
        return HullPoint(None, None)
    decomp, e_hull = hull.decomposition_and_e_above_hull(entry)
    return HullPoint(e_hull, decomposition_json(decomp))


Placer = Callable[[ReferenceHull], ComputedEntry]


def _placer(entry: ComputedEntry, reference: ReferenceHull, fidelity: str | None, check_potcar: bool) -> Placer:
    """How one single-fidelity prediction is put on a hull's energy scale (the hull is an argument: the all-model
    hull of GGA_GGA+U_R2SCAN has its own mixing state)."""
    if reference.thermo_type != GGA_GGA_U_R2SCAN:
        corrected = correct_like_reference(entry, reference.thermo_type, check_potcar=check_potcar)
        return lambda hull: corrected
    if fidelity is not None and fidelity.lower() == "r2scan":
        raw = uncorrected(entry)
        return lambda hull: place_on_mixed_scale(hull.mixing, r2scan=raw)
    pbe = correct_like_reference(entry, GGA_GGA_U_R2SCAN, check_potcar=check_potcar)
    return lambda hull: place_on_mixed_scale(hull.mixing, pbe=pbe)


def _hull_rows(
    items: Iterable[tuple[ComputedEntry, Callable[[], Placer]]], reference: ReferenceHull,
    model_hull: ReferenceHull | None, fidelity: str,
) -> list[dict[str, Any]]:
    rows = []
    for entry, make_placer in items:
        row: dict[str, Any] = {
            "candidate_id": str(entry.entry_id), "formula": entry.composition.reduced_formula,
            "chemsys": chemsys_of(entry), "fidelity": fidelity, "thermo_type": reference.thermo_type,
            "energy": float(entry.uncorrected_energy), "energy_per_atom": None, "correction": None,
            "e_hull_pred_dft_hull": None, "decomposition_dft_hull": None, "e_hull_pred_model_hull": None,
            "decomposition_model_hull": None, "error": None,
        }
        try:
            place = make_placer()
            corrected = place(reference)
            row["energy_per_atom"] = float(corrected.energy_per_atom)
            row["correction"] = float(corrected.correction)
            dft = _point(reference, corrected)
            model = _point(model_hull, None if model_hull is None else place(model_hull))
        except Exception as exc:  # noqa: BLE001 - a failed candidate keeps its row with the error
            row["error"] = f"{type(exc).__name__}: {exc}"
        else:
            row.update({"e_hull_pred_dft_hull": dft.e_above_hull, "decomposition_dft_hull": dft.decomposition,
                        "e_hull_pred_model_hull": model.e_above_hull,
                        "decomposition_model_hull": model.decomposition})
        rows.append(row)
    return rows


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
    ``fidelity``, when given, must be the reference's: energies of different fidelities are never compared;
    a GGA_GGA+U_R2SCAN hull takes ``pbe`` (default) or ``r2scan`` predictions, placed on its scale by
    :func:`pipeline.hull.thermo.place_on_mixed_scale` (both heads at once: :func:`mixed_e_above_hull`).
    Returns one dict per prediction (a failure keeps its row with ``error`` set):
    ``candidate_id, formula, chemsys, fidelity, thermo_type, energy, energy_per_atom, correction,
    e_hull_pred_dft_hull, decomposition_dft_hull, e_hull_pred_model_hull, decomposition_model_hull, error``
    (the columns of :data:`pipeline.report.schema.REPORT_SCHEMA`).
    """
    allowed = {"pbe", "r2scan"} if reference.thermo_type == GGA_GGA_U_R2SCAN else {reference.fidelity}
    if fidelity is not None and fidelity.lower() not in allowed:
        raise RecordError(f"predictions at fidelity {fidelity!r} against a {reference.thermo_type} "
                          f"{reference.fidelity!r} reference hull")
    model_hull = None if model_energies is None else model_reference_hull(reference, model_energies)
    fid = (fidelity or reference.fidelity).lower()
    return _hull_rows(((e, lambda e=e: _placer(e, reference, fid, check_potcar)) for e in predictions),
                      reference, model_hull, fid)


def mixed_e_above_hull(
    pbe: Iterable[ComputedEntry],
    r2scan: Iterable[ComputedEntry],
    reference: ReferenceHull,
    *,
    model_energies: Mapping[str, float] | None = None,
    check_potcar: bool = False,
) -> list[dict[str, Any]]:
    """GGA_GGA+U_R2SCAN E_hull of candidates predicted at both heads of a multi-fidelity model.

    ``pbe`` and ``r2scan`` are prediction entries (raw model energies, relaxed at each head) with the candidate id
    as entry_id; a candidate may miss one of the two (its row then uses the other, when the scheme allows).
    Each candidate's PBE energy (MP2020-corrected) and r2SCAN energy are placed on the mixed hull the way
    pymatgen's ``MaterialsProjectDFTMixingScheme`` places a material with both calculations
    (:func:`pipeline.hull.thermo.place_on_mixed_scale`). ``model_energies``: raw model energies of the reference
    entries given to the scheme (GGA ones at the PBE head, r2SCAN ones at the r2SCAN head) for the all-model
    hull, which re-runs the scheme on them. Rows as :func:`e_above_hull`, ``fidelity`` = ``pbe+r2scan``;
    ``energy`` is the PBE raw energy when there is one.
    """
    if reference.thermo_type != GGA_GGA_U_R2SCAN or reference.mixing is None:
        raise RecordError(f"both-head predictions need a GGA_GGA+U_R2SCAN hull, not {reference.thermo_type}")
    by_pbe = {str(e.entry_id): e for e in pbe}
    by_r2 = {str(e.entry_id): e for e in r2scan}
    model_hull = None if model_energies is None else model_reference_hull(reference, model_energies)

    def placer(cid: str) -> Placer:
        p = by_pbe.get(cid)
        p = None if p is None else correct_like_reference(p, GGA_GGA_U_R2SCAN, check_potcar=check_potcar)
        r = by_r2.get(cid)
        r = None if r is None else uncorrected(r)
        return lambda hull: place_on_mixed_scale(hull.mixing, pbe=p, r2scan=r)

    ids = list(dict.fromkeys([*by_pbe, *by_r2]))
    items = [(by_pbe.get(cid) or by_r2[cid], lambda cid=cid: placer(cid)) for cid in ids]
    return _hull_rows(items, reference, model_hull, "pbe+r2scan")


def decomposition_ids(decomposition: str | None) -> list[str]:
    """Entry ids of a decomposition JSON (empty for None)."""
    return sorted(json.loads(decomposition)) if decomposition else []
