"""Check the stress sign convention of labelled frames against their energies (physics, no model needed).

Between two nearby frames of one trajectory, first-order thermodynamics gives the energy change from the
labels alone. Write the cell change as a deformation ``D`` (``cell_b = cell_a @ D.T``, strain
``eps = sym(D) - I``) plus a non-affine displacement ``u`` of each atom (its fractional-coordinate change,
minimum image, in Cartesian). With the ASE convention (``stress = (1/V) dE/d(strain)``, tensile positive)::

    dE ~ V * sum(stress * eps) - sum(forces * u)

evaluated with mid-point labels (average of both frames). With the VASP convention the stress term flips sign.
Comparing the measured ``dE`` with both predictions tells the convention, provided the cell changes enough that
the stress term is larger than the error of the first-order formula. ASE's ``StrainFilter`` and VASP's
ISIF=3 relaxations rely on the same relation; no library exposes it as a check, hence this small module.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms

from pipeline.frames import row_to_atoms
from pipeline.sources.files.atoms_frames import MPTRJ_PREFIX


@dataclass(frozen=True)
class PairCheck:
    """Measured energy change of a frame pair and its first-order predictions under both sign conventions."""

    d_energy: float
    force_work: float  # -sum(F * u), eV
    stress_work: float  # V * sum(stress * eps) with the stress as labelled (ASE sign assumed), eV

    @property
    def error_as_labelled(self) -> float:
        return abs(self.d_energy - (self.force_work + self.stress_work))

    @property
    def error_if_flipped(self) -> float:
        return abs(self.d_energy - (self.force_work - self.stress_work))


def check_pair(a: Atoms, b: Atoms) -> PairCheck:
    """First-order energy balance between two frames with the same atoms (labels read from their calculators)."""
    if len(a) != len(b) or not np.array_equal(a.numbers, b.numbers):
        raise ValueError("frames of a pair must hold the same atoms in the same order")
    h0, h1 = a.cell.array, b.cell.array
    deform = np.linalg.solve(h0, h1).T
    eps = 0.5 * (deform + deform.T) - np.eye(3)
    ds = b.cell.scaled_positions(b.positions) - a.cell.scaled_positions(a.positions)
    ds -= np.round(ds)
    u = ds @ (0.5 * (h0 + h1))
    forces = 0.5 * (a.get_forces() + b.get_forces())
    stress = 0.5 * (a.get_stress(voigt=False) + b.get_stress(voigt=False))
    volume = 0.5 * (a.get_volume() + b.get_volume())
    return PairCheck(
        d_energy=float(b.get_potential_energy() - a.get_potential_energy()),
        force_work=float(-np.sum(forces * u)),
        stress_work=float(volume * np.sum(stress * eps)),
    )


@dataclass(frozen=True)
class SignVerdict:
    """How many frame pairs the labelled sign explains better than the flipped one, and median errors (eV)."""

    n_pairs: int
    n_labelled_better: int
    median_error_as_labelled: float
    median_error_if_flipped: float
    median_abs_stress_work: float


def stress_sign_verdict(pairs: Iterable[tuple[Atoms, Atoms]]) -> SignVerdict:
    """Summarise :func:`check_pair` over frame pairs (consecutive ionic steps of relaxations work well)."""
    checks = [check_pair(a, b) for a, b in pairs]
    if not checks:
        raise ValueError("no frame pairs to check")
    as_lab = np.array([c.error_as_labelled for c in checks])
    flipped = np.array([c.error_if_flipped for c in checks])
    return SignVerdict(
        n_pairs=len(checks),
        n_labelled_better=int(np.sum(as_lab < flipped)),
        median_error_as_labelled=float(np.median(as_lab)),
        median_error_if_flipped=float(np.median(flipped)),
        median_abs_stress_work=float(np.median([abs(c.stress_work) for c in checks])),
    )


def mptrj_step_pairs(rows: Iterable[Mapping[str, Any]]) -> list[tuple[Atoms, Atoms]]:
    """Consecutive ionic steps of one task and calculation among frame rows with ``mptrj:`` ids, as Atoms."""
    by_calc: dict[tuple[str, str], list[tuple[int, Mapping[str, Any]]]] = collections.defaultdict(list)
    for row in rows:
        if not str(row["frame_id"]).startswith(f"{MPTRJ_PREFIX}:"):
            continue
        task, calc, step = str(row["frame_id"]).split(":", 1)[1].rsplit("-", 2)
        by_calc[(task, calc)].append((int(step), row))
    pairs = []
    for steps in by_calc.values():
        steps.sort(key=lambda s: s[0])
        pairs += [
            (row_to_atoms(a), row_to_atoms(b))
            for (s0, a), (s1, b) in itertools.pairwise(steps)
            if s1 - s0 == 1
        ]
    return pairs
