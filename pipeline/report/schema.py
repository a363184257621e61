"""Report schemas (defined in :mod:`pipeline.schema` with every other file's schema) and report constants.

Two E_hull values per candidate, never to be confused:

* ``e_hull_pred_dft_hull``: predicted energy against the DFT reference hull of the same fidelity;
* ``e_hull_pred_model_hull``: predicted energy against the all-model hull (reference phases re-computed by the
  model: one consistent energy scale).

``e_hull_true`` is the DFT answer (DFT energy of the candidate against the DFT reference hull) when known.
All E_hull values are in eV/atom; negative means below the hull.
"""

from __future__ import annotations

from pipeline.hull.ehull import HULL_DFT, HULL_MODEL
from pipeline.schema import RELAX_STATUSES, REPORT_SCHEMA, REPORT_SCHEMA_VERSION, SUMMARY_SCHEMA

__all__ = ["HULL_COLUMNS", "RELAX_STATUSES", "REPORT_SCHEMA", "REPORT_SCHEMA_VERSION", "SUMMARY_SCHEMA"]

#: Which report column holds the prediction for each hull kind.
HULL_COLUMNS = {HULL_DFT: "e_hull_pred_dft_hull", HULL_MODEL: "e_hull_pred_model_hull"}

