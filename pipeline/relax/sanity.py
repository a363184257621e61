"""Physical sanity checks of a structure before and after relaxation, and of its predicted energy.

A potential happily relaxes nonsense (atoms on top of each other, a cell ten times too large) to a "converged"
energy far below the hull. These checks catch that and say why, with these thresholds:

==============================  ===========================================================  =================
check                           rule                                                          outcome
==============================  ===========================================================  =================
coordinates                     every coordinate finite, and within ``MAX_CELLS_AWAY`` (100)  failed (before)
                                cells of the origin (further away, wrapping into the cell
                                silently loses the position's precision)
minimum distance                every pair distance >= ``MIN_DISTANCE_FACTOR`` (0.6) x the    failed (before),
                                sum of the two elements' covalent radii (Cordero et al.       suspect (after)
                                2008, via ASE); real solids sit at 0.8-1.1x
volume per atom                 within [min / ``VOLUME_FACTOR``, max x ``VOLUME_FACTOR``]      suspect
                                (factor 2) of the reference phases' volumes per atom
energy                          predicted E_hull vs the DFT hull >= -``MAX_BELOW_HULL``        suspect (after)
                                (0.3 eV/atom): a new phase that far below every known one
                                is almost always a model failure (good potentials err by
                                ~0.03-0.05 eV/atom on E_hull)
==============================  ===========================================================  =================

*failed*: the candidate is not relaxed (or its result not used) and its row carries the reason. *suspect*: the
row keeps its predictions and is listed with its reason, but stays out of the metrics.
Written here because pymatgen's ``Structure.is_valid`` only knows one absolute distance for all elements.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from ase.data import covalent_radii
from pymatgen.core import Structure

MIN_DISTANCE_FACTOR = 0.6
MAX_CELLS_AWAY = 100.0
VOLUME_FACTOR = 2.0
MAX_BELOW_HULL = 0.3

FAILED, SUSPECT = "failed", "suspect"


@dataclass(frozen=True)
class Finding:
    """One failed check: ``level`` is 'failed' or 'suspect', ``reason`` says what and by how much."""

    level: str
    reason: str


def coordinate_findings(structure: Structure) -> list[Finding]:
    """Non-finite coordinates or lattice, or atoms more than ``MAX_CELLS_AWAY`` cells from the origin."""
    frac = np.asarray(structure.frac_coords, dtype=float)
    if not np.isfinite(structure.lattice.matrix).all():
        return [Finding(FAILED, "lattice has non-finite values")]
    if not np.isfinite(frac).all():
        return [Finding(FAILED, "non-finite atomic coordinates")]
    far = float(np.abs(frac).max()) if len(frac) else 0.0
    if far > MAX_CELLS_AWAY:
        return [Finding(FAILED, f"an atom lies {far:.3g} cells from the origin (more than {MAX_CELLS_AWAY:g}): "
                                "its position cannot be wrapped into the cell without losing precision")]
    return []


def distance_findings(structure: Structure, level: str = FAILED) -> list[Finding]:
    """Closest pair (periodic images included) against ``MIN_DISTANCE_FACTOR`` x the covalent radii sum."""
    if len(structure) < 1:
        return []
    numbers = np.array([site.specie.Z for site in structure])
    dist = structure.distance_matrix.copy() if len(structure) > 1 else np.zeros((1, 1))
    np.fill_diagonal(dist, np.inf)
    # an atom's own periodic images: the shortest lattice vector
    self_dist = float(min(structure.lattice.abc))
    radii = covalent_radii[numbers]
    limit = MIN_DISTANCE_FACTOR * (radii[:, None] + radii[None, :])
    ratio = dist / (radii[:, None] + radii[None, :])
    i, j = np.unravel_index(int(np.argmin(ratio)), ratio.shape)
    out = []
    if dist[i, j] < limit[i, j]:
        a, b = structure[int(i)].specie.symbol, structure[int(j)].specie.symbol
        out.append(Finding(level, f"atoms {a}{i} and {b}{j} are {dist[i, j]:.2f} A apart, below "
                                  f"{MIN_DISTANCE_FACTOR:g} x their covalent radii sum ({limit[i, j]:.2f} A)"))
    smallest = int(np.argmin(radii))
    if self_dist < MIN_DISTANCE_FACTOR * 2 * radii[smallest] and not out:
        out.append(Finding(level, f"lattice vector of {self_dist:.2f} A: an atom sits below "
                                  f"{MIN_DISTANCE_FACTOR:g} x twice its covalent radius from its own image"))
    return out


def reference_volume_range(structures: Iterable[Structure]) -> tuple[float, float] | None:
    """(smallest, largest) volume per atom of the reference phases (A^3/atom); None without structures."""
    vols = [s.volume / len(s) for s in structures if s is not None and len(s)]
    return (min(vols), max(vols)) if vols else None


def volume_findings(structure: Structure, volume_range: tuple[float, float] | None) -> list[Finding]:
    """Volume per atom outside [min / VOLUME_FACTOR, max x VOLUME_FACTOR] of the reference phases: suspect."""
    if volume_range is None or len(structure) == 0:
        return []
    lo, hi = volume_range[0] / VOLUME_FACTOR, volume_range[1] * VOLUME_FACTOR
    v = structure.volume / len(structure)
    if lo <= v <= hi:
        return []
    return [Finding(SUSPECT, f"volume {v:.3g} A^3/atom outside {lo:.3g}..{hi:.3g} A^3/atom ({VOLUME_FACTOR:g}x the "
                             "range of the reference phases)")]


def energy_findings(e_hull_pred: float | None) -> list[Finding]:
    """A predicted E_hull (vs the DFT hull) below -MAX_BELOW_HULL eV/atom: suspect."""
    if e_hull_pred is None or not np.isfinite(e_hull_pred) or e_hull_pred >= -MAX_BELOW_HULL:
        return []
    return [Finding(SUSPECT, f"predicted E_hull {e_hull_pred:.3f} eV/atom, more than {MAX_BELOW_HULL:g} eV/atom "
                             "below every known phase")]


def before_relaxation(structure: Structure, volume_range: tuple[float, float] | None = None) -> list[Finding]:
    """Checks of an input structure: coordinates and distances (failed), volume (suspect)."""
    found = coordinate_findings(structure)
    if found:
        return found
    return distance_findings(structure, FAILED) + volume_findings(structure, volume_range)


def after_relaxation(structure: Structure, volume_range: tuple[float, float] | None = None,
                     e_hull_pred: float | None = None) -> list[Finding]:
    """Checks of a relaxed structure and its energy: every finding is 'suspect' (the relaxation ran)."""
    found = [Finding(SUSPECT, f.reason) for f in coordinate_findings(structure)]
    if not found:
        found = distance_findings(structure, SUSPECT) + volume_findings(structure, volume_range)
    return found + energy_findings(e_hull_pred)


def worst(findings: Iterable[Finding]) -> str | None:
    """'failed' if any finding failed, else 'suspect' if any, else None."""
    levels = {f.level for f in findings}
    return FAILED if FAILED in levels else SUSPECT if SUSPECT in levels else None


def describe(findings: Iterable[Finding]) -> str:
    return "; ".join(f.reason for f in findings)
