"""Reference hulls (pymatgen phase diagrams per thermo type), E_hull of predictions, and candidate structures."""

from pipeline.hull.ehull import HULL_DFT, HULL_MODEL, e_above_hull, model_reference_hull, prediction_entry
from pipeline.hull.phase_diagram import ReferenceHull, build_reference_hull, build_reference_hulls
from pipeline.hull.thermo import (
    GGA_GGA_U,
    GGA_GGA_U_R2SCAN,
    R2SCAN,
    RAW,
    THERMO_TYPES,
    ThermoEntries,
    ThermoError,
    correct_like_reference,
    thermo_entries,
)

__all__ = [
    "GGA_GGA_U",
    "GGA_GGA_U_R2SCAN",
    "HULL_DFT",
    "HULL_MODEL",
    "R2SCAN",
    "RAW",
    "THERMO_TYPES",
    "ReferenceHull",
    "ThermoEntries",
    "ThermoError",
    "build_reference_hull",
    "build_reference_hulls",
    "correct_like_reference",
    "e_above_hull",
    "model_reference_hull",
    "prediction_entry",
    "thermo_entries",
]
