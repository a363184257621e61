"""Acquisition: which candidates get the next r2SCAN calculations.

``uncertainty``: the probability that the candidate's E_hull lies on the other side of the stability threshold
from its predicted mean, P = Phi(-|mu - thr| / sigma), highest first (ties: larger sigma, then id), within a budget
of N per round. ``random``: N uniformly drawn from the eligible candidates (the baseline). Candidates already
labelled, failed, or without a finite prediction are not eligible.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy.stats import norm

STRATEGIES = ("uncertainty", "random")


def p_other_side(mu: Sequence[float], sigma: Sequence[float], threshold: float = 0.0) -> np.ndarray:
    """P(E_hull on the other side of ``threshold`` than ``mu``) under N(mu, sigma^2); NaN where undefined.

    sigma == 0: 0 (certain), or 0.5 when mu sits exactly on the threshold."""
    m = np.asarray(mu, dtype=float)
    s = np.asarray(sigma, dtype=float)
    if m.shape != s.shape:
        raise ValueError(f"mu and sigma differ in shape: {m.shape} vs {s.shape}")
    if np.any(s < 0):
        raise ValueError("sigma must be >= 0")
    d = np.abs(m - threshold)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = norm.cdf(-d / s)
    p = np.where(s == 0, np.where(d == 0, 0.5, 0.0), p)
    return np.where(np.isfinite(m) & np.isfinite(s), p, np.nan)


def rank(ids: Sequence[str], mu: Sequence[float], sigma: Sequence[float], threshold: float = 0.0,
         exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
    """Eligible candidates as (id, P) from the most to the least likely to be misclassified."""
    p = p_other_side(mu, sigma, threshold)
    s = np.asarray(sigma, dtype=float)
    skip = set(exclude)
    rows = [(str(i), float(p[k]), float(s[k])) for k, i in enumerate(ids) if i not in skip and np.isfinite(p[k])]
    rows.sort(key=lambda r: (-r[1], -r[2], r[0]))
    return [(i, pk) for i, pk, _ in rows]


def select(strategy: str, ids: Sequence[str], mu: Sequence[float], sigma: Sequence[float], budget: int,
           threshold: float = 0.0, exclude: Iterable[str] = (), rng: np.random.Generator | None = None) -> list[str]:
    """Up to ``budget`` candidate ids to label next (fewer when fewer are eligible)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown acquisition strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    ranked = rank(ids, mu, sigma, threshold, exclude)
    if strategy == "uncertainty":
        return [i for i, _ in ranked[:budget]]
    eligible = sorted(i for i, _ in ranked)
    rng = rng or np.random.default_rng(0)
    take = min(budget, len(eligible))
    return [eligible[k] for k in rng.choice(len(eligible), size=take, replace=False)] if take else []
