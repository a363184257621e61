"""Symmetry constraint for the batched relaxer: forces and stress averaged over the space-group operations that
spglib finds in the starting structure, exactly as ASE's ``FixSymmetry`` does (its helpers are reused:
``ase.spacegroup.symmetrize.prep_symmetry``, ``symmetrize_rank1``, ``symmetrize_rank2``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.spacegroup.symmetrize import prep_symmetry, refine_symmetry, symmetrize_rank1, symmetrize_rank2

__all__ = ["SymmetryOps", "symmetry_ops"]


@dataclass(frozen=True)
class SymmetryOps:
    """Rotations and translations (fractional) and the atom map of each operation."""

    rotations: np.ndarray
    translations: np.ndarray
    symm_map: list[list[int]]

    def apply(self, cell: np.ndarray, forces: np.ndarray, stress: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Symmetrised (forces (n, 3), stress (3, 3)) for the current cell (rows = lattice vectors)."""
        inv = np.linalg.inv(cell)
        f = symmetrize_rank1(cell, inv, forces, self.rotations, self.translations, self.symm_map)
        s = symmetrize_rank2(cell, inv, stress, self.rotations)
        return f, s


def symmetry_ops(atoms: Atoms, symprec: float = 0.01) -> tuple[Atoms, SymmetryOps]:
    """A copy of ``atoms`` with its symmetry refined at tolerance ``symprec`` (A) and its operations, as
    FixSymmetry prepares them."""
    atoms = atoms.copy()
    refine_symmetry(atoms, symprec)
    rot, trans, symm_map = prep_symmetry(atoms, symprec)
    return atoms, SymmetryOps(np.asarray(rot), np.asarray(trans), symm_map)
