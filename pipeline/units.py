"""Unit and sign conversions used by the importers."""

from __future__ import annotations

import numpy as np
from ase.units import GPa

#: 1 kBar expressed in eV/Angstrom^3.
KBAR = 0.1 * GPa


def vasp_kbar_to_ase_stress(stress_kbar: np.ndarray | list) -> np.ndarray:
    """VASP/MP stress (kBar, compressive positive) -> ASE stress (eV/Angstrom^3, tensile positive)."""
    return -np.asarray(stress_kbar, dtype=float).reshape(3, 3) * KBAR


def ase_stress_to_gpa(stress: np.ndarray) -> np.ndarray:
    """ASE stress (eV/Angstrom^3) -> GPa, same sign."""
    return np.asarray(stress, dtype=float) / GPa
