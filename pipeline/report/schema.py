"""Arrow schemas of the screening report (one row per candidate) and of its metrics summary.

Two E_hull values per candidate, never to be confused:

* ``e_hull_pred_dft_hull``: predicted energy against the DFT reference hull of the same fidelity;
* ``e_hull_pred_model_hull``: predicted energy against the all-model hull (reference phases re-computed by the
  model: one consistent energy scale).

``e_hull_true`` is the DFT answer (DFT energy of the candidate against the DFT reference hull) when known.
All E_hull values are in eV/atom; negative means below the hull.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.hull.ehull import HULL_DFT, HULL_MODEL
from pipeline.schema import _f

REPORT_SCHEMA_VERSION = "1"

#: Relaxation outcomes a report row may carry.
RELAX_STATUSES = ("converged", "not_converged", "failed", "not_relaxed")

REPORT_SCHEMA = pa.schema(
    [
        _f("candidate_id", pa.string(), "Candidate key (see CANDIDATES_SCHEMA).", False),
        _f("formula", pa.string(), "Reduced formula; null when the candidate could not be read."),
        _f("chemsys", pa.string(), "Sorted element symbols joined by '-'."),
        _f("source", pa.string(), "Where the candidate came from: 'file', 'substitution', or another label."),
        _f("origin", pa.string(), "File path or prototype id the candidate was made from."),
        _f("fidelity", pa.string(), "Fidelity of the predicted energies and of both hulls (pbe, r2scan, gpaw-pbe...)."),
        _f("thermo_type", pa.string(), "Thermo type of the reference hull: R2SCAN, GGA_GGA+U, GGA_GGA+U_R2SCAN, raw."),
        _f("model_id", pa.string(), "Id of the model (checkpoint) that predicted the energies."),
        _f("data_snapshot_id", pa.string(), "Id of the reference-data snapshot the hulls were built from."),
        _f("relax_status", pa.string(), f"Relaxation outcome: one of {', '.join(RELAX_STATUSES)}; null if unknown."),
        _f("relax_steps", pa.int32(), "Number of optimizer steps of the relaxation; null if unknown."),
        _f("energy", pa.float64(), "Predicted RAW total energy of the (relaxed) cell (eV)."),
        _f("energy_per_atom", pa.float64(),
           "Predicted energy per atom on the hull's scale, i.e. with the thermo type's corrections (eV/atom)."),
        _f("correction", pa.float64(), "Total energy correction applied to the prediction (eV), 0 for R2SCAN/raw."),
        _f("e_hull_pred_dft_hull", pa.float64(), "E_hull of the prediction vs the DFT reference hull (eV/atom)."),
        _f("decomposition_dft_hull", pa.string(), "JSON {reference entry_id: fraction}: decomposition on that hull."),
        _f("e_hull_pred_model_hull", pa.float64(), "E_hull of the prediction vs the all-model hull (eV/atom)."),
        _f("decomposition_model_hull", pa.string(), "JSON {reference entry_id: fraction} on the all-model hull."),
        _f("e_hull_true", pa.float64(), "DFT E_hull of the candidate vs the DFT reference hull, if known (eV/atom)."),
        _f("error", pa.string(), "Why this candidate failed (read, relax or hull step); null when it did not.", True),
        _f("meta", pa.string(), "JSON object with any other provenance."),
    ],
    metadata={"name": "report", "schema_version": REPORT_SCHEMA_VERSION},
)

#: Which report column holds the prediction for each hull kind.
HULL_COLUMNS = {HULL_DFT: "e_hull_pred_dft_hull", HULL_MODEL: "e_hull_pred_model_hull"}

SUMMARY_SCHEMA = pa.schema(
    [
        _f("hull", pa.string(), "Which prediction: 'dft_hull' (vs DFT reference hull) or 'model_hull' (all-model).",
           False),
        _f("stability_threshold", pa.float64(), "E_hull at or below which a candidate counts as stable (eV/atom).",
           False),
        _f("n", pa.int64(), "Candidates with a known DFT E_hull (the metric population).", False),
        _f("n_missing_pred", pa.int64(), "Of those, candidates without a prediction (counted as predicted unstable).",
           False),
        _f("prevalence", pa.float64(), "Fraction of truly stable candidates."),
        _f("precision", pa.float64(), "TP / (TP + FP)."),
        _f("recall", pa.float64(), "TP / (TP + FN)."),
        _f("f1", pa.float64(), "Harmonic mean of precision and recall."),
        _f("accuracy", pa.float64(), "(TP + TN) / n."),
        _f("daf", pa.float64(), "Discovery acceleration factor = precision / prevalence."),
        _f("tp", pa.int64(), "True positives (stable, predicted stable)."),
        _f("fp", pa.int64(), "False positives."),
        _f("tn", pa.int64(), "True negatives."),
        _f("fn", pa.int64(), "False negatives."),
        _f("mae", pa.float64(), "Mean absolute error of E_hull over candidates with both values (eV/atom)."),
        _f("rmse", pa.float64(), "Root-mean-square error of E_hull (eV/atom)."),
        _f("r2", pa.float64(), "Coefficient of determination of E_hull."),
    ],
    metadata={"name": "report_summary", "schema_version": REPORT_SCHEMA_VERSION},
)
