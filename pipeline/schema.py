"""Arrow schemas of every file the pipeline writes, documented field by field (with units).

Conventions (enforced by the converters in :mod:`pipeline.frames` and :mod:`pipeline.entries`):

* Lengths in Angstrom, energies in eV, forces in eV/Angstrom, stresses in eV/Angstrom^3.
* ``energy`` of a frame is the RAW total energy of the whole cell as the DFT code printed it (no MP2020 or
  any other correction).
* **Stress sign convention: ASE / physics (tensile positive).** ``stress = (1/V) dE/d(strain)``: a cell that is
  compressed (wants to expand) has a NEGATIVE stress. VASP (and MP task documents, in kBar) print the opposite
  sign; importers convert with :func:`pipeline.units.vasp_kbar_to_ase_stress`.
* Fidelity is a plain lower-case string naming the level of theory AND its energy scale, e.g. ``pbe`` and
  ``r2scan`` for Materials Project (VASP, MP input sets), ``gpaw-pbe`` / ``gpaw-r2scan`` for the project's own
  GPAW labels. Energies of different fidelities are never mixed without a reference shift.
* A report row carries two predicted E_hull values, never to be confused: ``e_hull_pred_dft_hull`` (predicted
  energy against the DFT reference hull of the same fidelity) and ``e_hull_pred_model_hull`` (against the
  all-model hull, whose reference phases are re-computed by the model: one energy scale). ``e_hull_true`` is the
  DFT answer when known. E_hull in eV/atom; negative means below the hull.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"

VEC3 = pa.list_(pa.float64(), 3)
MAT3 = pa.list_(VEC3, 3)


def _f(name: str, typ: pa.DataType, doc: str, nullable: bool = True, unit: str | None = None) -> pa.Field:
    """A documented field; ``unit`` (e.g. 'eV/atom') is stored machine-readably beside the doc."""
    return pa.field(name, typ, nullable=nullable, metadata={"doc": doc, **({"unit": unit} if unit else {})})


def field_units(schema: pa.Schema) -> dict[str, str]:
    """{field name: unit} of the fields that carry a ``unit`` key in their metadata."""
    return {f.name: f.metadata[b"unit"].decode() for f in schema if f.metadata and b"unit" in f.metadata}


FRAMES_SCHEMA = pa.schema(
    [
        _f("frame_id", pa.string(), "Unique key: '<source>:<record id>[:<ionic step>]' or a content hash.", False),
        _f("material_id", pa.string(), "Materials Project id (mp-...) or other material id; null if unknown."),
        _f("task_id", pa.string(), "Calculation (task) id the frame comes from; null if unknown."),
        _f("source", pa.string(), "Where the frame came from: mptrj-extxyz, mp-task, mp-api, ase-db, gpaw, ...", False),
        _f("fidelity", pa.string(), "Level of theory + energy scale: pbe, r2scan, gpaw-pbe, gpaw-r2scan, ...", False),
        _f("numbers", pa.list_(pa.int32()), "Atomic numbers, one per atom.", False),
        _f("positions", pa.list_(VEC3), "Cartesian positions (Angstrom), n_atoms x 3.", False),
        _f("cell", MAT3, "Lattice vectors as rows (Angstrom), 3 x 3.", False),
        _f("pbc", pa.list_(pa.bool_(), 3), "Periodic boundary conditions along each lattice vector.", False),
        _f("energy", pa.float64(), "Raw (uncorrected) total energy of the cell (eV); null when missing."),
        _f("forces", pa.list_(VEC3), "Forces (eV/Angstrom), n_atoms x 3; null when missing."),
        _f("stress", MAT3, "Stress (eV/Angstrom^3), 3 x 3, ASE sign convention (compressed cell < 0); null when missing."),
        _f("has_energy", pa.bool_(), "Mask: energy label present.", False),
        _f("has_forces", pa.bool_(), "Mask: forces label present.", False),
        _f("has_stress", pa.bool_(), "Mask: stress label present.", False),
        _f("magmoms", pa.list_(pa.float64()), "Magnetic moments per atom (Bohr magneton); null when missing."),
        _f("run_type", pa.string(), "Functional as MP names it: GGA, GGA+U, R2SCAN, PBE, ...; null if unknown."),
        _f("calc_type", pa.string(), "MP calc type, e.g. 'GGA+U Structure Optimization'; null if unknown."),
        _f("ionic_step", pa.int32(), "Index of the ionic step in its trajectory; null for a single point."),
        _f("meta", pa.string(), "JSON object with any other provenance (software versions, settings, info keys)."),
    ],
    metadata={"name": "frames", "schema_version": SCHEMA_VERSION},
)

ENTRIES_SCHEMA = pa.schema(
    [
        _f("entry_id", pa.string(), "Key: pymatgen entry_id (e.g. 'mp-841-R2SCAN') or '<material>-<run type>'.", False),
        _f("thermo_type", pa.string(),
           "Thermo type the correction belongs to: GGA_GGA+U, R2SCAN, GGA_GGA+U_R2SCAN, or 'raw'.", False),
        _f("material_id", pa.string(), "Materials Project id (mp-...) or other material id; null if unknown."),
        _f("source", pa.string(), "Where the entry came from: mp-api, entries-json, res, matpes, gpaw, ...", False),
        _f("fidelity", pa.string(), "pbe, r2scan, gpaw-pbe, ... (see module doc).", False),
        _f("run_type", pa.string(), "GGA, GGA+U, R2SCAN, ...; null if unknown."),
        _f("formula", pa.string(), "Reduced formula, e.g. 'Li2O'.", False),
        _f("chemsys", pa.string(), "Sorted element symbols joined by '-', e.g. 'Li-O'.", False),
        _f("composition", pa.string(), "JSON object element -> amount in the cell.", False),
        _f("nsites", pa.int32(), "Number of sites in the structure (or atoms in the composition).", False),
        _f("structure", pa.string(), "pymatgen Structure.as_dict() as JSON; null for a ComputedEntry with no structure."),
        _f("uncorrected_energy", pa.float64(), "Raw total energy (eV) of the cell.", False),
        _f("correction", pa.float64(), "Sum of energy adjustments (eV).", False),
        _f("energy", pa.float64(), "Corrected total energy = uncorrected_energy + correction (eV).", False),
        _f("energy_per_atom", pa.float64(), "Corrected energy per atom (eV/atom).", False),
        _f("energy_adjustments", pa.string(), "JSON list of pymatgen EnergyAdjustment dicts (MontyEncoder)."),
        _f("parameters", pa.string(), "JSON of entry.parameters (run_type, hubbards, is_hubbard, potcar_spec...)."),
        _f("data", pa.string(), "JSON of entry.data (task_id, oxide_type, aspherical, ...)."),
        _f("entry_class", pa.string(), "pymatgen class: ComputedStructureEntry or ComputedEntry.", False),
        _f("meta", pa.string(), "JSON object with other provenance (file name, snapshot id, ...)."),
    ],
    metadata={"name": "entries", "schema_version": SCHEMA_VERSION},
)

REJECTS_SCHEMA = pa.schema(
    [
        _f("record_id", pa.string(), "Id of the record that could not be imported (file:index or document id).", False),
        _f("source", pa.string(), "Importer / source name.", False),
        _f("error", pa.string(), "Why the record was rejected.", False),
    ],
    metadata={"name": "rejects", "schema_version": SCHEMA_VERSION},
)

RELAXATIONS_SCHEMA = pa.schema(
    [
        _f("candidate_id", pa.string(), "Id of the relaxed structure (candidate or reference phase).", False),
        _f("model_id", pa.string(), "Id of the potential (checkpoint name + hash) that relaxed it.", False),
        _f("fidelity", pa.string(), "Fidelity of the run (the reference data's fidelity in a screening).", False),
        _f("model_fidelity", pa.string(), "Fidelity head of the potential that relaxed it (null: same as fidelity)."),
        _f("relax_key", pa.string(), "Content key: sha256 of the input structure + model_id + model fidelity + "
           "settings; a stored row is reused only when this matches.", False),
        _f("settings", pa.string(), "JSON of the relaxation settings that enter relax_key (engine, optimizer, fmax, "
           "steps, dtype, symmetry, ...); batched rows add 'batch': the batch budget used and how it was measured "
           "(not part of the key)."),
        _f("role", pa.string(), "'candidate' or 'reference' (a reference phase re-computed by the model).", False),
        _f("formula", pa.string(), "Reduced formula.", False),
        _f("chemsys", pa.string(), "Sorted elements joined by '-'.", False),
        _f("nsites", pa.int32(), "Number of atoms.", False),
        _f("structure_initial", pa.string(), "pymatgen Structure JSON before relaxation.", False),
        _f("structure", pa.string(), "pymatgen Structure JSON after relaxation; null if it failed."),
        _f("energy", pa.float64(), "Model total energy of the relaxed cell (eV); null if it failed."),
        _f("energy_per_atom", pa.float64(), "Model energy per atom (eV/atom); null if it failed."),
        _f("fmax", pa.float64(), "Convergence measure at the end (eV/Angstrom): largest row norm of the forces the "
           "optimizer sees (atoms and, with the cell filter, the Frechet cell forces); converged means < settings fmax."),
        _f("smax", pa.float64(), "Largest residual stress component at the end (eV/Angstrom^3)."),
        _f("n_steps", pa.int32(), "Optimizer steps taken."),
        _f("status", pa.string(), "'converged', 'not_converged' (step limit reached) or 'failed'.", False),
        _f("error", pa.string(), "Error message when status is 'failed'."),
        _f("wall_s", pa.float64(), "Wall time of the relaxation (s)."),
    ],
    metadata={"name": "relaxations", "schema_version": SCHEMA_VERSION},
)

CANDIDATES_SCHEMA = pa.schema(
    [
        _f("candidate_id", pa.string(), "Key: '<file name>[:<index>]' or '<prototype id>:<A>><X>,...'.", False),
        _f("formula", pa.string(), "Reduced formula, e.g. 'LiNiO2'.", False),
        _f("chemsys", pa.string(), "Sorted element symbols joined by '-'.", False),
        _f("source", pa.string(), "'file' (user file) or 'substitution' (prototype substitution).", False),
        _f("origin", pa.string(), "File path (and frame index), or the prototype's entry/material id.", False),
        _f("substitution", pa.string(), "JSON {prototype element: target element}; null for files."),
        _f("nsites", pa.int32(), "Number of sites.", False),
        _f("structure", pa.string(), "pymatgen Structure.as_dict() as JSON (Angstrom).", False),
        _f("meta", pa.string(), "JSON object with other provenance."),
    ],
    metadata={"name": "candidates", "schema_version": "1"},
)

REPORT_SCHEMA_VERSION = "3"

#: Relaxation outcomes a report row may carry.
RELAX_STATUSES = ("converged", "not_converged", "failed", "not_relaxed")

_EV_ATOM = "eV/atom"

REPORT_SCHEMA = pa.schema(
    [
        _f("candidate_id", pa.string(), "Candidate key (see CANDIDATES_SCHEMA).", False),
        _f("material_id", pa.string(), "Materials Project (or WBM/Alexandria) id of the candidate when known."),
        _f("run_id", pa.string(), "Id of the screening run (its provenance is in the file's 'provenance' metadata)."),
        _f("formula", pa.string(), "Reduced formula; null when the candidate could not be read."),
        _f("chemsys", pa.string(), "Sorted element symbols joined by '-'."),
        _f("source", pa.string(), "Where the candidate came from: 'file', 'substitution', or another label."),
        _f("origin", pa.string(), "File path or prototype id the candidate was made from."),
        _f("fidelity", pa.string(), "Fidelity of the predicted energies (pbe, r2scan, gpaw-pbe...; 'pbe+r2scan' "
           "when both heads of a multi-fidelity model entered the GGA_GGA+U_R2SCAN mixing scheme)."),
        _f("thermo_type", pa.string(), "Thermo type of the reference hull: R2SCAN, GGA_GGA+U, GGA_GGA+U_R2SCAN, raw."),
        _f("model_id", pa.string(), "Id of the model (checkpoint) that predicted the energies."),
        _f("data_snapshot_id", pa.string(), "Id of the reference-data snapshot the hulls were built from."),
        _f("relax_status", pa.string(), f"Relaxation outcome: one of {', '.join(RELAX_STATUSES)}; null if unknown."),
        _f("relax_steps", pa.int32(), "Number of optimizer steps of the relaxation; null if unknown."),
        _f("relax_key", pa.string(), "Content key of the relaxation behind the energies (the relaxations table's "
           "relax_key); two heads: their keys joined by '+' in the order of fidelity; null if not relaxed."),
        _f("relax_settings", pa.string(), "JSON of the relaxation settings that enter relax_key (engine, optimizer, "
           "fmax, steps, relax_cell, dtype, symmetry, guards, FIRE parameters); null if not relaxed."),
        _f("energy", pa.float64(), "Predicted RAW total energy of the (relaxed) cell (eV).", unit="eV"),
        _f("energy_per_atom", pa.float64(),
           "Predicted energy per atom on the hull's scale, i.e. with the thermo type's corrections (eV/atom).",
           unit=_EV_ATOM),
        _f("correction", pa.float64(), "Total energy correction applied to the prediction (eV), 0 for R2SCAN/raw.",
           unit="eV"),
        _f("e_hull_pred_dft_hull", pa.float64(), "E_hull of the prediction vs the DFT reference hull (eV/atom).",
           unit=_EV_ATOM),
        _f("decomposition_dft_hull", pa.string(), "JSON {reference entry_id: fraction}: decomposition on that hull."),
        _f("e_hull_pred_model_hull", pa.float64(), "E_hull of the prediction vs the all-model hull (eV/atom).",
           unit=_EV_ATOM),
        _f("decomposition_model_hull", pa.string(), "JSON {reference entry_id: fraction} on the all-model hull."),
        _f("e_hull_true", pa.float64(), "DFT E_hull of the candidate vs the DFT reference hull, if known (eV/atom).",
           unit=_EV_ATOM),
        _f("structure", pa.string(), "Relaxed structure, pymatgen Structure.as_dict() as JSON (Angstrom); "
           "also written as structures/relaxed.extxyz and structures/<candidate>.cif.", unit="Angstrom"),
        _f("error", pa.string(), "Why this candidate failed (read, relax or hull step); null when it did not.", True),
        _f("meta", pa.string(), "JSON object with any other provenance."),
    ],
    metadata={"name": "report", "schema_version": REPORT_SCHEMA_VERSION},
)

#: Metric columns of SUMMARY_SCHEMA, named as matbench-discovery prints them.
METRIC_NAMES = ("F1", "DAF", "Precision", "Recall", "Accuracy", "TPR", "FPR", "TNR", "FNR", "TP", "FP", "TN", "FN",
                "MAE", "RMSE", "R2")

SUMMARY_SCHEMA = pa.schema(
    [
        _f("run_id", pa.string(), "Id of the screening run (the report's run_id)."),
        _f("model_id", pa.string(), "Id of the model (checkpoint) whose predictions are scored."),
        _f("fidelity", pa.string(), "Fidelity of the predicted energies (as in the report)."),
        _f("thermo_type", pa.string(), "Thermo type of the reference hull."),
        _f("hull", pa.string(), "Which prediction: 'dft_hull' (vs DFT reference hull) or 'model_hull' (all-model).",
           False),
        _f("stability_threshold", pa.float64(), "E_hull at or below which a candidate counts as stable (eV/atom).",
           False, unit=_EV_ATOM),
        _f("n", pa.int64(), "Candidates with a known DFT E_hull (the metric population).", False),
        _f("n_missing_pred", pa.int64(), "Of those, candidates without a prediction (counted as predicted unstable).",
           False),
        _f("prevalence", pa.float64(), "Fraction of truly stable candidates."),
        _f("F1", pa.float64(), "Harmonic mean of precision and recall."),
        _f("DAF", pa.float64(), "Discovery acceleration factor = precision / prevalence."),
        _f("Precision", pa.float64(), "TP / (TP + FP)."),
        _f("Recall", pa.float64(), "TP / (TP + FN) (= TPR)."),
        _f("Accuracy", pa.float64(), "(TP + TN) / n."),
        _f("TPR", pa.float64(), "True positive rate TP / (TP + FN)."),
        _f("FPR", pa.float64(), "False positive rate FP / (FP + TN)."),
        _f("TNR", pa.float64(), "True negative rate TN / (TN + FP)."),
        _f("FNR", pa.float64(), "False negative rate FN / (FN + TP)."),
        _f("TP", pa.int64(), "True positives (stable, predicted stable)."),
        _f("FP", pa.int64(), "False positives."),
        _f("TN", pa.int64(), "True negatives."),
        _f("FN", pa.int64(), "False negatives."),
        _f("MAE", pa.float64(), "Mean absolute error of E_hull over candidates with both values (eV/atom).",
           unit=_EV_ATOM),
        _f("RMSE", pa.float64(), "Root-mean-square error of E_hull (eV/atom).", unit=_EV_ATOM),
        _f("R2", pa.float64(), "Coefficient of determination of E_hull."),
    ],
    metadata={"name": "report_summary", "schema_version": REPORT_SCHEMA_VERSION},
)

KEYS: dict[str, tuple[str, ...]] = {
    "frames": ("frame_id",),
    "entries": ("entry_id", "thermo_type"),
    "rejects": ("record_id", "source"),
    "relaxations": ("candidate_id", "relax_key"),
    "candidates": ("candidate_id",),
    "report": ("candidate_id",),
}


def describe(schema: pa.Schema) -> str:
    """Markdown table of a schema's fields (name, type, nullable, doc) for the README."""
    rows = ["| field | type | nullable | meaning |", "|---|---|---|---|"]
    for field in schema:
        doc = (field.metadata or {}).get(b"doc", b"").decode()
        rows.append(f"| `{field.name}` | `{field.type}` | {'yes' if field.nullable else 'no'} | {doc} |")
    return "\n".join(rows)


ALL_SCHEMAS: dict[str, pa.Schema] = {
    "frames": FRAMES_SCHEMA,
    "entries": ENTRIES_SCHEMA,
    "rejects": REJECTS_SCHEMA,
    "relaxations": RELAXATIONS_SCHEMA,
    "candidates": CANDIDATES_SCHEMA,
    "report": REPORT_SCHEMA,
    "report_summary": SUMMARY_SCHEMA,
}


def markdown(schemas: dict[str, pa.Schema] | None = None) -> str:
    """All schemas as Markdown sections (the README's schema part is generated from this)."""
    parts = []
    for name, schema in (schemas or ALL_SCHEMAS).items():
        key = ", ".join(f"`{k}`" for k in KEYS.get(name, ()))
        parts.append(f"### {name}\n\nKey: {key}\n\n{describe(schema)}\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(markdown())
