"""Reference hulls (pymatgen phase diagrams per thermo type), E_hull of predictions, and candidate structures."""

from pipeline.hull.candidates import (
    CANDIDATES_SCHEMA,
    candidates_table,
    read_candidate_files,
    substitute_prototypes,
)
from pipeline.hull.ehull import (
    HULL_DFT,
    HULL_MODEL,
    e_above_hull,
    mixed_e_above_hull,
    model_reference_hull,
    prediction_entry,
)
from pipeline.hull.phase_diagram import ReferenceHull, build_reference_hull, build_reference_hulls
from pipeline.hull.thermo import (
    GGA_GGA_U,
    GGA_GGA_U_R2SCAN,
    R2SCAN,
    RAW,
    THERMO_TYPES,
    MixingState,
    ThermoEntries,
    ThermoError,
    correct_like_reference,
    place_on_mixed_scale,
    thermo_entries,
)

__all__ = [
    "CANDIDATES_SCHEMA",
    "GGA_GGA_U",
    "GGA_GGA_U_R2SCAN",
    "HULL_DFT",
    "HULL_MODEL",
    "R2SCAN",
    "RAW",
    "THERMO_TYPES",
    "MixingState",
    "ReferenceHull",
    "ThermoEntries",
    "ThermoError",
    "build_reference_hull",
    "build_reference_hulls",
    "candidates_table",
    "correct_like_reference",
    "e_above_hull",
    "mixed_e_above_hull",
    "model_reference_hull",
    "place_on_mixed_scale",
    "prediction_entry",
    "read_candidate_files",
    "substitute_prototypes",
    "thermo_entries",
]
