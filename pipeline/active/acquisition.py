"""Acquisition: which candidates get the next r2SCAN calculations.

``uncertainty``: the probability that the candidate's E_hull lies on the other side of the stability threshold
from its predicted mean, P = Phi(-|mu - thr| / sigma), highest first (ties: larger sigma, then id), within a budget
of N per round. ``lookahead``: the batch that most lowers the expected number of misclassified candidates over
the whole pool (:func:`lookahead_select`, from the screen's joint samples). ``random``: N uniformly drawn from the
eligible candidates (the baseline). Candidates already labelled, failed, or without a finite prediction are not
eligible.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy.stats import norm

STRATEGIES = ("uncertainty", "lookahead", "random")


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
    if strategy == "lookahead":
        raise ValueError("lookahead needs the screen's joint samples: call lookahead_select")
    if strategy == "uncertainty":
        return [i for i, _ in ranked[:budget]]
    eligible = sorted(i for i, _ in ranked)
    rng = rng or np.random.default_rng(0)
    take = min(budget, len(eligible))
    return [eligible[k] for k in rng.choice(len(eligible), size=take, replace=False)] if take else []


def expected_misclassified(h: np.ndarray, log_w: np.ndarray | None = None, threshold: float = 0.0) -> np.ndarray:
    """Expected number of misclassified candidates (stable = E_hull <= threshold) under sample weights.

    ``h``: (S, n) joint samples of the candidates' E_hull. ``log_w``: (..., T, S) log weights of the samples under
    T hypotheses (None: equal weights, one hypothesis). Per hypothesis, each candidate is classified by the weighted
    majority and counts its weighted probability of being on the other side, min(p, 1 - p); returns (..., T)."""
    stable = (np.asarray(h, dtype=float) <= threshold).astype(float)
    if log_w is None:
        p = stable.mean(axis=0)
        return np.asarray(np.minimum(p, 1.0 - p).sum())
    w = np.exp(log_w - log_w.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    p = w @ stable
    return np.minimum(p, 1.0 - p).sum(axis=-1)


def lookahead_select(ids: Sequence[str], h_samples: np.ndarray, e_samples: np.ndarray, budget: int,
                     threshold: float = 0.0, exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
    """Greedy batch by expected misclassification reduction (lookahead), as (id, expected misclassified after
    labelling the batch so far) in pick order.

    ``h_samples`` / ``e_samples``: (S, n) joint samples of every candidate's E_hull and of the energies per atom
    they come from (the screen's draws: GP residual posterior per ensemble member, each through its own hull).
    Labelling candidate c is simulated by taking each sample's energy of c in turn as the label (hypothesis t)
    and re-weighting the other samples by how close their energy of c lies to it (a Gaussian product kernel over
    the batch's candidates, Scott's bandwidth for that many dimensions; leave-one-out: sample t itself is left
    out, else it agrees with its own hypothesis and the expected error falls towards 0 with every pick, whatever
    is picked); the pick lowers the mean over hypotheses of :func:`expected_misclassified` the most. Labels
    already in the batch stay in the weights, so a candidate whose uncertainty the batch has already resolved
    (a polymorph of a picked composition, a phase whose E_hull hangs on a picked hull vertex) loses its value.

    Why not ``uncertainty`` alone: P(other side) scores each candidate's own classification; F1 is over the whole
    pool, where a hull vertex's label moves every neighbour's E_hull, and four picks of one composition resolve
    one question four times. No library here does this for E_hull (it is the expected-error-reduction criterion
    of Roy & McCallum 2001, evaluated on joint posterior samples, so the hull's non-linearity is kept)."""
    h = np.asarray(h_samples, dtype=float)
    e = np.asarray(e_samples, dtype=float)
    if h.shape != e.shape or h.ndim != 2 or h.shape[1] != len(ids):
        raise ValueError(f"samples must be (S, {len(ids)}) each, got {h.shape} and {e.shape}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    n_s = h.shape[0]
    h = np.where(np.isfinite(h), h, np.inf)  # a sample without a hull distance counts as unstable
    skip = set(exclude)
    spread = e.std(axis=0)
    cand = [k for k, i in enumerate(ids) if str(i) not in skip and np.isfinite(spread[k]) and spread[k] > 0]
    if budget == 0 or not any(str(i) not in skip for i in ids):
        return []
    if n_s < 2:
        raise ValueError(f"lookahead needs at least 2 joint samples, got {n_s}")
    loo = np.where(np.eye(n_s, dtype=bool), -np.inf, 0.0)  # hypotheses x samples; a sample never weighs itself
    chosen: list[int] = []
    picks: list[tuple[str, float]] = []
    for _ in range(min(budget, len(cand))):
        dims = len(chosen) + 1
        bw = 1.06 * spread * n_s ** (-1.0 / (dims + 4))  # Scott's rule in `dims` dimensions (Silverman's at 1)
        log_w = loo.copy()
        for k in chosen:
            log_w -= 0.5 * ((e[None, :, k] - e[:, None, k]) / bw[k]) ** 2
        d = e[None, :, cand].transpose(2, 0, 1) - e[:, None, cand].transpose(2, 0, 1)  # (C, T, S): e_s - e_t
        trial = log_w[None] - 0.5 * (d / bw[cand][:, None, None]) ** 2
        scores = expected_misclassified(h, trial, threshold).mean(axis=-1)  # (C,)
        best = int(np.argmin(scores))
        k = cand.pop(best)
        chosen.append(k)
        picks.append((str(ids[k]), float(scores[best])))
    return picks
