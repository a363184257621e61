"""Per-fidelity element reference energies (the energy shift) and energy scale.

PBE and r2SCAN total energies differ by eV per atom (r2SCAN Si: about -8.7 eV/atom, PBE: -5.4 eV/atom), so every
fidelity gets its own element references. They are fitted jointly (:func:`fit_element_references`): the
fidelity with the most energy labels is the base, every other fidelity is the base plus a mean offset plus
per-element deviations pulled toward that mean by a ridge prior, and copies of one structure at two fidelities
enter as energy differences. A fidelity with a handful of structures (or a single composition, a rank-deficient
system on its own) thus still gets per-element values within the spread of the offsets, instead of absorbing
the excess energy of a high-energy phase into one element and the rest into another.

The scale of a fidelity is the RMS of its force components (SevenNet's choice: the network then predicts
O(1) numbers); a fidelity with few force labels shares the base fidelity's scale, and any other is bounded
around it, so the scale cannot collapse on a few equilibrium cells.

Users can override any value (:meth:`ElementReferences.override`), e.g. with isolated-atom or elemental-ground-
state energies of their own DFT set.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from ase.data import atomic_numbers, chemical_symbols

from pipeline.hashing import structure_hash

log = logging.getLogger(__name__)

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


#: ridge weight of the per-element deviations from a fidelity's mean offset, in units of one single-element
#: unpaired structure: the variance ratio (sigma/tau)^2 of an unpaired per-atom energy's structure-dependent part
#: (formation/excess energies, sigma ~ 0.3 eV/atom) to the spread of per-element offsets (tau ~ 1 eV/atom)
OFFSET_RIDGE = 0.1
#: weight of a paired energy difference relative to an unpaired energy: (sigma_unpaired / sigma_paired)^2 with
#: sigma_paired ~ 0.03 eV/atom (the structure's own energy cancels in the difference)
PAIRED_WEIGHT = 100.0
#: a non-base fidelity needs force labels on at least this many structures to get its own scale
MIN_SCALE_FRAMES = 20
#: ... and that scale is kept within this factor of the base fidelity's
SCALE_BOUND = 2.0


def _counts(numbers: Iterable[int]) -> np.ndarray:
    return np.bincount(np.asarray(list(numbers), dtype=int), minlength=119).astype(float)


def _force_rms(forces: Sequence[np.ndarray | None], idx: Iterable[int]) -> tuple[float | None, int]:
    comps = [np.asarray(forces[k], dtype=float).ravel() for k in idx if forces[k] is not None]
    if not comps:
        return None, 0
    flat = np.concatenate(comps)
    flat = flat[np.isfinite(flat)]
    rms = float(np.sqrt(np.mean(flat**2))) if flat.size else 0.0
    return (rms if rms > 0 else None), len(comps)


def fit_element_references(
    numbers: Sequence[Iterable[int]],
    energies: Sequence[float],
    fidelities: Sequence[str],
    forces: Sequence[np.ndarray | None] | None = None,
    structure_keys: Sequence[str | None] | None = None,
    *,
    ridge: float = OFFSET_RIDGE,
    paired_weight: float = PAIRED_WEIGHT,
    base: str | None = None,
) -> ElementReferences:
    """Joint least-squares element references of all fidelities, and one scale per fidelity.

    numbers: atomic numbers of each structure; energies: total energy of each structure (eV; NaN = no label);
    fidelities: fidelity of each structure; forces: optional (n_atoms, 3) arrays (None = no label) for the scale;
    structure_keys: optional structure digests (:func:`pipeline.hashing.structure_hash`) pairing the copies of
    one structure at several fidelities. ``base``: the reference fidelity (default: the one with the most
    energy labels).

    The model (per-atom energies, each structure weighted equally, whatever its size; x = composition fractions)::

        base fidelity:  E/n = x . b
        fidelity f:     E/n = x . (b + d_f + delta_f)        ref_f[el] = b[el] + d_f + delta_f[el]
        paired copy:    (E_f - E_base)/n = x . (d_f + delta_f)   (same structure at both fidelities)
        prior:          ridge * |delta_f|^2                     (per-element deviation from the mean offset d_f)

    (paired rows weighted ``paired_weight`` x an unpaired row in the squared error)

    solved as one least-squares problem (numpy ``lstsq``; a still rank-deficient base fit, e.g. one composition
    only, gets the minimum-norm split). Pairing removes the structure's own energy (a high-energy phase, a rattled
    cell) from the offset; the prior gives a fidelity with 1-5 structures, or a single composition, the mean
    offset for the elements it cannot separate, and elements it never saw get ``b + d_f``.

    Scales: the fidelity with the most force-labelled structures sets the base scale, the RMS of its force
    components (without any forces: the RMS of the energy base's per-atom residuals, else 1). Another fidelity
    keeps the base scale unless it has forces on at least ``MIN_SCALE_FRAMES`` structures; its own force RMS is
    then bounded to within ``SCALE_BOUND`` x the base's, so a few (near-)equilibrium cells can never collapse it.
    """
    n = len(energies)
    if not (len(numbers) == n == len(fidelities)):
        raise ValueError(f"{len(numbers)} structures, {n} energies and {len(fidelities)} fidelities: lengths differ")
    if structure_keys is not None and len(structure_keys) != n:
        raise ValueError(f"{len(structure_keys)} structure keys for {n} structures")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    fids = np.array([str(f).strip().lower() for f in fidelities], dtype=object)
    e_all = np.asarray(energies, dtype=float)
    labelled = np.isfinite(e_all)
    counts_by_fid = {f: int(np.sum(labelled & (fids == f))) for f in sorted(set(fids))}
    energy_fids = [f for f, c in counts_by_fid.items() if c]
    refs = ElementReferences()
    if not energy_fids:
        return refs
    if base is None:
        base = max(energy_fids, key=lambda f: (counts_by_fid[f], f == energy_fids[0]))
    base = str(base).strip().lower()
    if base not in energy_fids:
        raise ValueError(f"base fidelity {base!r} has no energy labels; fidelities with energies: {energy_fids}")
    others = [f for f in energy_fids if f != base]
    x_all = [_counts(numbers[k]) if labelled[k] else None for k in range(n)]
    present = np.flatnonzero(np.sum([x for x in x_all if x is not None], axis=0) > 0)
    ne = present.size
    col_d = {f: ne + j * (ne + 1) for j, f in enumerate(others)}  # d_f, then delta_f[ne]
    n_cols = ne + len(others) * (ne + 1)
    base_energy: dict[str, list[float]] = {}
    if structure_keys is not None:
        for k in np.flatnonzero(labelled & (fids == base)):
            if structure_keys[k]:
                base_energy.setdefault(structure_keys[k], []).append(e_all[k])
    rows, rhs = [], []
    for k in np.flatnonzero(labelled):
        x = x_all[k][present]
        nat = x.sum()
        row = np.zeros(n_cols)
        target = e_all[k] / nat
        paired = structure_keys is not None and fids[k] != base and structure_keys[k] in base_energy
        if not paired:
            row[:ne] = x / nat
        else:
            target -= float(np.mean(base_energy[structure_keys[k]])) / nat
        if fids[k] != base:
            c = col_d[fids[k]]
            row[c] = 1.0
            row[c + 1:c + 1 + ne] = x / nat
        w = np.sqrt(paired_weight) if paired else 1.0
        rows.append(w * row)
        rhs.append(w * target)
    for f in others:
        c = col_d[f]
        for j in range(ne):
            row = np.zeros(n_cols)
            row[c + 1 + j] = np.sqrt(ridge)
            rows.append(row)
            rhs.append(0.0)
    a, y = np.asarray(rows), np.asarray(rhs)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    b = coef[:ne]
    def seen(fid: str) -> np.ndarray:
        """Per present element: does a labelled structure of ``fid`` contain it?"""
        return np.sum([x_all[k] for k in np.flatnonzero(labelled & (fids == fid))], axis=0)[present] > 0

    refs.energies[base] = {chemical_symbols[z]: float(v) for z, v, s in zip(present, b, seen(base)) if s}
    for f in others:
        c = col_d[f]
        ref_f = b + coef[c] + coef[c + 1:c + 1 + ne]
        refs.energies[f] = {chemical_symbols[z]: float(v) for z, v in zip(present, ref_f)}
        unseen = [chemical_symbols[z] for z, s in zip(present, seen(f)) if not s]
        if unseen:
            els = ", ".join(unseen)
            log.warning("fidelity %s: no energy label on any structure containing %s; the %s reference is the %s one "
                        "plus the mean offset, a guess off by as much as the elements' offsets differ: label a "
                        "structure containing %s at %s", f, els, els, base, els, f)

    # scales: the fidelity with the most force labels sets the shared scale (the energy base's residual RMS
    # when no fidelity has forces)
    all_fids = sorted(set(fids))
    force_stats = {f: _force_rms(forces, np.flatnonzero(fids == f)) if forces is not None else (None, 0)
                   for f in all_fids}
    with_forces = [f for f in all_fids if force_stats[f][0] is not None]
    if with_forces:
        scale_base = max(with_forces, key=lambda f: (force_stats[f][1], f == base))
        base_scale = force_stats[scale_base][0]
    else:
        scale_base = base
        kb = np.flatnonzero(labelled & (fids == base))
        nat = np.array([x_all[k].sum() for k in kb])
        pred = np.array([x_all[k][present] @ b for k in kb])
        resid = (e_all[kb] - pred) / nat
        rms = float(np.sqrt(np.mean(resid**2))) if resid.size > 1 else 0.0
        base_scale = rms if rms > 1e-6 else 1.0
    for f in all_fids:
        own, n_frames = force_stats[f]
        if f == scale_base or own is None or n_frames < MIN_SCALE_FRAMES:
            refs.scales[f] = base_scale
        else:
            refs.scales[f] = float(np.clip(own, base_scale / SCALE_BOUND, base_scale * SCALE_BOUND))
    return refs


def references_from_frames(frames: pa.Table, *, ridge: float = OFFSET_RIDGE,
                           base: str | None = None) -> ElementReferences:
    """Fit references from a frames table (:data:`pipeline.schema.FRAMES_SCHEMA`), using rows with energy labels
    for the shift and rows with force labels for the scale; copies of one structure at several fidelities are
    paired by :func:`pipeline.hashing.structure_hash`. Apply the label policy to the table first
    (``pipeline.train.data.apply_label_policy``): its ``has_*`` columns are what counts here."""
    cols = frames.select(["numbers", "positions", "cell", "pbc", "energy", "fidelity", "has_energy", "forces",
                          "has_forces"]).to_pydict()
    energies = [e if (h and e is not None) else float("nan") for e, h in zip(cols["energy"], cols["has_energy"])]
    forces = [np.asarray(f) if (h and f is not None) else None for f, h in zip(cols["forces"], cols["has_forces"])]
    keys = [structure_hash(z, p, c, pbc) for z, p, c, pbc in zip(cols["numbers"], cols["positions"], cols["cell"],
                                                                  cols["pbc"])]
    return fit_element_references(cols["numbers"], energies, cols["fidelity"], forces, keys, ridge=ridge, base=base)
