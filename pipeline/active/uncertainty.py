"""Uncertainty of predicted energies and hull distances: ensemble spread, fidelity-gap novelty, calibration,
coverage.

* **Ensemble**: M models (different seeds and training splits) predict every candidate; each member's energies
  give its own hull and E_hull, so the spread of E_hull includes the hull's own uncertainty.
* **Fidelity gap**: the models' high - low prediction (r2SCAN - PBE, eV/atom) of a candidate is compared with the
  gaps DFT gave for the nearest labelled composition (materials labelled at both fidelities): a gap far from
  theirs (``gap_dev``, eV/atom) flags a candidate unlike the training data even when the members agree.
* **Calibration** (:class:`Calibration`, :func:`fit_scale`): one scale factor on sigma, fitted on held-out errors
  (predictions made before the label was seen) with an optional prior, so that the normalised errors have unit
  variance.
* **Coverage**: observed fraction of held-out errors inside the central interval of each nominal level
  (:func:`coverage_curve`), plotted against the nominal level (:func:`plot_coverage`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition
from scipy.stats import norm

#: nominal levels of the coverage curve
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)

#: E_hull of an entry that is a vertex of the hull is measured against the hull of the OTHER entries (negative:
#: how far below them it lies), so stable and unstable candidates both get a continuous distance.
ON_HULL_TOL = 1e-8


def hull_distances(compositions: Sequence[Composition], energies_per_atom: Sequence[float],
                   fixed: Sequence[tuple[Composition, float]] = ()) -> np.ndarray:
    """E_hull (eV/atom) of every entry against the hull of all the others (and of ``fixed`` reference points).

    Positive: above the hull of the others (unstable); negative: below it (stable, by that margin). An entry
    that is the only phase of an element present (a terminal that cannot be left out) gets 0. Non-finite
    energies are left out of the hull and get NaN.
    """
    e = np.asarray(energies_per_atom, dtype=float)
    ok = np.isfinite(e)
    entries = [PDEntry(c, float(v) * c.num_atoms, name=str(k)) for k, (c, v) in enumerate(zip(compositions, e))
               if math.isfinite(v)]
    ref = [PDEntry(c, float(v) * c.num_atoms, name=f"ref{k}") for k, (c, v) in enumerate(fixed)]
    out = np.full(len(e), np.nan)
    if not entries:
        return out
    pd = PhaseDiagram(entries + ref)
    idx = [k for k in range(len(e)) if ok[k]]
    for k, entry in zip(idx, entries):
        d = pd.get_e_above_hull(entry, allow_negative=True)
        if d is not None and d > ON_HULL_TOL:
            out[k] = d
            continue
        others = [x for x in entries if x is not entry] + ref
        present = {el for x in others for el in x.composition.elements}
        if not set(entry.composition.elements) <= present:
            out[k] = 0.0
            continue
        try:
            pd_o = PhaseDiagram(others, elements=pd.elements)
            out[k] = float(e[k] - pd_o.get_hull_energy_per_atom(entry.composition))
        except ValueError:  # a missing terminal in the hull of the others
            out[k] = 0.0
    return out


def ensemble_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof=1; 0 for one member) over axis 0 of an (M, N) array, NaN-aware."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or v.shape[0] < 1:
        raise ValueError(f"expected an (members, candidates) array, got shape {v.shape}")
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (failed candidates) stay NaN
        mean = np.nanmean(v, axis=0) if v.shape[0] > 1 else v[0].copy()
        std = np.nanstd(v, axis=0, ddof=1) if v.shape[0] > 1 else np.zeros(v.shape[1])
    return mean, std


def composition_features(compositions: Sequence[Composition], elements: Sequence[str]) -> np.ndarray:
    """Fractional composition over ``elements`` (rows sum to 1)."""
    return np.array([[c.get_atomic_fraction(el) for el in elements] for c in compositions], dtype=float)


def gap_novelty(pred_gap: np.ndarray, features: np.ndarray, train_features: np.ndarray, train_gap: np.ndarray,
                k: int = 5, floor: float = 0.005, radius: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each predicted gap from the DFT gaps of its nearest labelled materials in composition.

    Neighbours: the labelled materials within ``radius`` (fractional-composition distance) of the nearest one, at
    most ``k`` (e.g. the polymorphs of the nearest labelled composition), so that gaps of other chemistries do
    not enter. Returns ``(gap_dev, gap_z)``: ``gap_dev`` = |gap - their mean gap| (eV/atom), ``gap_z`` =
    gap_dev / (their standard deviation, at least ``floor``). Without labelled pairs both are NaN.
    """
    g = np.asarray(pred_gap, dtype=float)
    tg = np.asarray(train_gap, dtype=float)
    if len(tg) == 0:
        return np.full(len(g), np.nan), np.full(len(g), np.nan)
    d = np.linalg.norm(features[:, None, :] - train_features[None, :, :], axis=-1)
    dev, z = np.empty(len(g)), np.empty(len(g))
    for i in range(len(g)):
        order = np.argsort(d[i], kind="stable")
        near = [j for j in order[:max(1, k)] if d[i, j] <= d[i, order[0]] + radius]
        mean, std = tg[near].mean(), (tg[near].std() if len(near) > 1 else 0.0)
        dev[i] = abs(g[i] - mean)
        z[i] = dev[i] / max(std, floor)
    return dev, z


@dataclass
class Calibration:
    """sigma -> s_ens * sigma (:func:`fit_scale`); ``n`` held-out errors it was fitted on."""

    s_ens: float = 1.0
    n: int = 0
    nll: float | None = None
    fitted: bool = False
    prior_dof: float = 0.0

    def sigma(self, sigma_ens: np.ndarray) -> np.ndarray:
        return self.s_ens * np.asarray(sigma_ens, dtype=float)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_scale(errors: Sequence[float], sigma: Sequence[float], prior_dof: float = 0.0, min_points: int = 3,
              floor: float = 1e-4) -> Calibration:
    """One scale factor s (sigma -> s * sigma) from held-out ``errors`` and the sigmas predicted for them.

    s^2 = (prior_dof + sum z_i^2) / (prior_dof + n), z = error / sigma: the conjugate (scaled inverse chi^2)
    update of a prior s = 1 worth ``prior_dof`` observations. With the fidelity-gap GP the prior is its
    maximum-likelihood fit to the labels (``prior_dof`` = labels beyond the per-element shift), so a round with
    a handful of held-out picks moves the scale only as far as they weigh against the labels; with
    ``prior_dof`` 0 it is the plain maximum-likelihood scale. Without a prior, fewer than ``min_points`` finite
    pairs give the identity (``fitted`` False)."""
    err = np.asarray(errors, dtype=float)
    sig = np.asarray(sigma, dtype=float)
    if err.shape != sig.shape:
        raise ValueError(f"errors and sigma differ in shape: {err.shape} vs {sig.shape}")
    if prior_dof < 0:
        raise ValueError(f"prior_dof must be >= 0, got {prior_dof}")
    ok = np.isfinite(err) & np.isfinite(sig)
    z2 = (err[ok] / np.maximum(sig[ok], floor)) ** 2
    n = int(ok.sum())
    if n < min_points and not prior_dof:
        return Calibration(n=n)
    s = float(np.sqrt((prior_dof + z2.sum()) / (prior_dof + len(z2))))
    return Calibration(s_ens=s, n=len(z2), fitted=bool(len(z2)), prior_dof=float(prior_dof))


def interval_halfwidth(sigma: np.ndarray, level: float) -> np.ndarray:
    """Half-width of the central ``level`` interval of N(mu, sigma^2)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return norm.ppf(0.5 + level / 2) * np.asarray(sigma, dtype=float)


def coverage(errors: Sequence[float], sigma: Sequence[float], level: float = 0.9) -> float | None:
    """Fraction of finite ``errors`` (prediction - truth) inside the central ``level`` interval."""
    err, sig = np.asarray(errors, dtype=float), np.asarray(sigma, dtype=float)
    ok = np.isfinite(err) & np.isfinite(sig)
    if not ok.any():
        return None
    return float(np.mean(np.abs(err[ok]) <= interval_halfwidth(sig[ok], level)))


def coverage_curve(errors: Sequence[float], sigma: Sequence[float],
                   levels: Sequence[float] = LEVELS) -> list[dict[str, float]]:
    """Observed coverage at each nominal level: [{level, observed, n}]."""
    err, sig = np.asarray(errors, dtype=float), np.asarray(sigma, dtype=float)
    n = int(np.sum(np.isfinite(err) & np.isfinite(sig)))
    return [{"level": float(p), "observed": coverage(err, sig, p), "n": n} for p in levels]


def plot_coverage(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, title: str = "",
                  colors: Mapping[str, str] | None = None) -> Path:
    """Coverage plot (observed vs nominal level, one line per curve, the diagonal = perfect calibration) as PNG,
    written atomically. ``colors``: optional matplotlib colour per curve label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=120)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="ideal")
    ax.axhspan(0.8, 0.95, xmin=0.85, xmax=0.95, color="0.6", alpha=0.25, label="target at 90 %: 80-95 %")
    for label, rows in curves.items():
        pts = [(r["level"], r["observed"]) for r in rows if r.get("observed") is not None]
        if pts:
            x, y = zip(*pts)
            n = rows[0].get("n", "")
            ax.plot(x, y, marker="o", ms=3, label=f"{label} (n={n})", color=(colors or {}).get(label))
    ax.set_xlabel("nominal coverage of the central interval")
    ax.set_ylabel("observed coverage (held-out)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "uncertainty calibration", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
