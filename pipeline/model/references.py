"""Per-fidelity element reference energies (the energy shift) and energy scale.

PBE and r2SCAN total energies differ by eV per atom (r2SCAN Si: about -8.7 eV/atom, PBE: -5.4 eV/atom), so every
fidelity gets its own element references, fitted by least squares before training:

    E_total(structure) ~= sum_elements count(element) * ref[fidelity][element]

solved for the per-atom energies (each structure weighted equally, whatever its size).

The scale of a fidelity is the RMS of its force components (SevenNet's choice: the network then predicts
O(1) numbers), or the RMS of the per-atom residual energy when no forces are given, or 1.

Users can override any value (:meth:`ElementReferences.override`), e.g. with isolated-atom or elemental-ground-
state energies of their own DFT set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from ase.data import atomic_numbers, chemical_symbols

__all__ = ["ElementReferences", "fit_element_references", "references_from_frames"]


@dataclass
class ElementReferences:
    """energies[fidelity][element symbol] in eV/atom; scales[fidelity] in eV (per-atom energy unit)."""

    energies: dict[str, dict[str, float]] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)

    @property
    def fidelities(self) -> list[str]:
        return sorted(set(self.energies) | set(self.scales))

    def override(self, fidelity: str, energies: Mapping[str, float] | None = None,
                 scale: float | None = None) -> ElementReferences:
        """Copy with user values for one fidelity (element symbol -> eV/atom, and/or the scale)."""
        fid = str(fidelity).strip().lower()
        new = ElementReferences({k: dict(v) for k, v in self.energies.items()}, dict(self.scales))
        if energies:
            for el, value in energies.items():
                if el not in atomic_numbers:
                    raise ValueError(f"unknown element {el!r} in reference override for {fid}")
                if not np.isfinite(value):
                    raise ValueError(f"reference energy of {el} for {fid} is not finite")
                new.energies.setdefault(fid, {})[el] = float(value)
        if scale is not None:
            if not (np.isfinite(scale) and scale > 0):
                raise ValueError(f"scale for {fid} must be positive and finite, got {scale}")
            new.scales[fid] = float(scale)
        return new

    def shift_matrix(self, fidelities: Sequence[str], elements: Sequence[int]) -> np.ndarray:
        """(n_fidelities, n_elements) shift table in model order.

        An element without a reference in some fidelity but present in another gets the other fidelity's value
        plus the median offset between the two fidelities over their shared elements (a documented estimate,
        better than 0, which would be off by eV/atom); an element known nowhere gets 0."""
        symbols = [chemical_symbols[z] for z in elements]
        out = np.zeros((len(fidelities), len(elements)))
        for a, fid in enumerate(fidelities):
            mine = self.energies.get(fid, {})
            for b, el in enumerate(symbols):
                if el in mine:
                    out[a, b] = mine[el]
                    continue
                for other, theirs in self.energies.items():
                    if other != fid and el in theirs:
                        common = [e for e in mine if e in theirs]
                        offset = float(np.median([mine[e] - theirs[e] for e in common])) if common else 0.0
                        out[a, b] = theirs[el] + offset
                        break
        return out

    def scale_vector(self, fidelities: Sequence[str]) -> np.ndarray:
        return np.array([self.scales.get(f, 1.0) for f in fidelities], dtype=float)

    def to_dict(self) -> dict[str, Any]:
        return {"energies": {k: dict(v) for k, v in self.energies.items()}, "scales": dict(self.scales)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ElementReferences:
        return cls({k: {e: float(x) for e, x in v.items()} for k, v in data.get("energies", {}).items()},
                   {k: float(v) for k, v in data.get("scales", {}).items()})


def fit_element_references(
    numbers: Sequence[Iterable[int]],
    energies: Sequence[float],
    fidelities: Sequence[str],
    forces: Sequence[np.ndarray | None] | None = None,
) -> ElementReferences:
    """Least-squares element references per fidelity from per-structure compositions and total energies.

    numbers: atomic numbers of each structure; energies: total energy of each structure (eV; NaN = no label);
    fidelities: fidelity of each structure; forces: optional (n_atoms, 3) arrays (None = no label) for the scale.
    Rank-deficient systems (e.g. one composition only) get numpy's minimum-norm solution.
    """
    n = len(energies)
    if not (len(numbers) == n == len(fidelities)):
        raise ValueError(f"{len(numbers)} structures, {n} energies and {len(fidelities)} fidelities: lengths differ")
    refs = ElementReferences()
    fids = np.array([str(f).strip().lower() for f in fidelities], dtype=object)
    e_all = np.asarray(energies, dtype=float)
    for fid in sorted({str(f) for f in fids}):
        idx = np.flatnonzero((fids == fid) & np.isfinite(e_all))
        if idx.size == 0:
            continue
        counts = [np.bincount(np.asarray(list(numbers[k]), dtype=int), minlength=119) for k in idx]
        a_full = np.stack(counts).astype(float)
        present = np.flatnonzero(a_full.sum(axis=0) > 0)
        a = a_full[:, present]
        e = e_all[idx]
        n_at = a.sum(axis=1)
        coef, *_ = np.linalg.lstsq(a / n_at[:, None], e / n_at, rcond=None)  # per-atom energies, as trained on
        refs.energies[fid] = {chemical_symbols[z]: float(c) for z, c in zip(present, coef)}
        scale = None
        if forces is not None:
            comps = [np.asarray(forces[k], dtype=float).ravel() for k in np.flatnonzero(fids == fid)
                     if forces[k] is not None]
            if comps:
                flat = np.concatenate(comps)
                flat = flat[np.isfinite(flat)]
                if flat.size and np.sqrt(np.mean(flat**2)) > 0:
                    scale = float(np.sqrt(np.mean(flat**2)))
        if scale is None:
            resid = (e - a @ coef) / n_at
            rms = float(np.sqrt(np.mean(resid**2))) if resid.size > 1 else 0.0
            scale = rms if rms > 1e-6 else 1.0
        refs.scales[fid] = scale
    return refs


def references_from_frames(frames: pa.Table) -> ElementReferences:
    """Fit references from a frames table (:data:`pipeline.schema.FRAMES_SCHEMA`), using rows with energy labels
    for the shift and rows with force labels for the scale."""
    cols = frames.select(["numbers", "energy", "fidelity", "has_energy", "forces", "has_forces"]).to_pydict()
    energies = [e if (h and e is not None) else float("nan") for e, h in zip(cols["energy"], cols["has_energy"])]
    forces = [np.asarray(f) if (h and f is not None) else None for f, h in zip(cols["forces"], cols["has_forces"])]
    return fit_element_references(cols["numbers"], energies, cols["fidelity"], forces)
