"""Acquisition ranking and the uncertainty pieces (hull distances, calibration, coverage, gap novelty)."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Composition
from scipy.stats import norm

from pipeline.active import acquisition
from pipeline.active.uncertainty import (
    coverage,
    coverage_curve,
    ensemble_stats,
    fit_scale,
    gap_novelty,
    hull_distances,
    plot_coverage,
)


def test_p_other_side_values():
    p = acquisition.p_other_side([0.0, 0.05, -0.05, 0.2, 0.1, np.nan], [0.05, 0.05, 0.05, 0.05, 0.0, 0.1], 0.0)
    assert p[0] == pytest.approx(0.5)
    assert p[1] == pytest.approx(norm.cdf(-1)) and p[2] == pytest.approx(norm.cdf(-1))
    assert p[3] == pytest.approx(norm.cdf(-4))
    assert p[4] == 0.0 and np.isnan(p[5])
    assert acquisition.p_other_side([0.1], [0.0], 0.1)[0] == 0.5  # on the threshold, no spread
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        acquisition.p_other_side([0.0], [-1.0])


def test_rank_orders_by_probability_of_misclassification():
    ids = ["far-stable", "near", "uncertain", "far-unstable", "labelled", "nan"]
    mu = [-0.3, 0.01, 0.1, 0.4, 0.0, np.nan]
    sigma = [0.05, 0.05, 0.2, 0.05, 0.05, 0.1]
    ranked = acquisition.rank(ids, mu, sigma, 0.0, exclude={"labelled"})
    assert [i for i, _ in ranked] == ["near", "uncertain", "far-stable", "far-unstable"]
    ps = [p for _, p in ranked]
    assert ps == sorted(ps, reverse=True)
    # the threshold moves the ranking: at 0.1 eV/atom 'uncertain' sits on it
    assert acquisition.rank(ids, mu, sigma, 0.1, exclude={"labelled"})[0][0] == "uncertain"
    # ties: larger sigma first, then id
    tie = acquisition.rank(["b", "a", "c"], [0.1, 0.1, 0.2], [0.1, 0.1, 0.2], 0.0)
    assert [i for i, _ in tie] == ["c", "a", "b"]


def test_select_budget_and_random_baseline():
    ids = [f"c{k}" for k in range(20)]
    mu = np.linspace(-0.2, 0.2, 20)
    sigma = np.full(20, 0.05)
    top = acquisition.select("uncertainty", ids, mu, sigma, budget=4, exclude={"c10"})
    assert top == [i for i, _ in acquisition.rank(ids, mu, sigma, exclude={"c10"})[:4]]
    assert "c10" not in top and set(top) == {"c9", "c11", "c8", "c12"}
    r1 = acquisition.select("random", ids, mu, sigma, 5, rng=np.random.default_rng(1), exclude={"c0"})
    r2 = acquisition.select("random", ids, mu, sigma, 5, rng=np.random.default_rng(1), exclude={"c0"})
    r3 = acquisition.select("random", ids, mu, sigma, 5, rng=np.random.default_rng(2), exclude={"c0"})
    assert r1 == r2 and r1 != r3 and len(set(r1)) == 5 and "c0" not in r1
    assert len(acquisition.select("uncertainty", ids, mu, sigma, 50)) == 20  # budget above the pool
    assert acquisition.select("random", ids, mu, sigma, 0) == []
    with pytest.raises(ValueError, match="unknown acquisition strategy"):
        acquisition.select("greedy", ids, mu, sigma, 3)


def test_lookahead_resolves_each_question_once_and_values_hull_vertices():
    """Two perfectly correlated candidates (a polymorph pair: one label answers both) get one pick, not two; a
    confident candidate whose E_hull hangs on an uncertain hull vertex makes that vertex worth more than its own
    P(other side) says; the expected misclassification count falls with every pick."""
    rng = np.random.default_rng(0)
    n_s = 200
    e = rng.normal(size=(n_s, 6)) * 0.05
    e[:, 3] = e[:, 0]  # c3 moves with c0
    h = e.copy()
    h[:, 4] += 1.0  # far from the threshold, zero spread in effect
    h[:, 5] -= 1.0
    ids = [f"c{k}" for k in range(6)]
    picks = acquisition.lookahead_select(ids, h, e, 3)
    chosen = [i for i, _ in picks]
    assert len(chosen) == 3 and not {"c0", "c3"} <= set(chosen) and {"c1", "c2"} <= set(chosen)
    after = [v for _, v in picks]
    before = float(acquisition.expected_misclassified(h))
    assert before > after[0] > after[1] > after[2] and after[2] < 0.5 * before  # measured: 1.80 -> 0.61
    assert acquisition.lookahead_select(ids, h, e, 3, exclude={"c0", "c3"})[0][0] in {"c1", "c2"}

    # hull vertex: 'v' is a little uncertain and far below the threshold's reach of its own class, but the E_hull
    # of five candidates 'd*' near the threshold is measured against it (h_d = their own small offset - e_v)
    e2 = np.zeros((n_s, 7))
    e2[:, 0] = rng.normal(size=n_s) * 0.03  # the vertex's energy
    e2[:, 6] = rng.normal(size=n_s) * 0.03  # an isolated candidate as uncertain as the vertex
    h2 = np.zeros((n_s, 7))
    h2[:, 0] = -0.2 + e2[:, 0]
    h2[:, 1:6] = 0.01 - e2[:, [0]] + rng.normal(size=(n_s, 5)) * 0.002
    h2[:, 6] = e2[:, 6]
    ids2 = ["v", "d1", "d2", "d3", "d4", "d5", "iso"]
    assert acquisition.rank(ids2, h2.mean(0), h2.std(0))[0][0] != "v"  # P(other side) ranks the vertex last
    assert acquisition.lookahead_select(ids2, h2, e2, 1)[0][0] == "v"
    with pytest.raises(ValueError, match=r"samples must be \(S, 7\)"):
        acquisition.lookahead_select(ids2, h2[:, :3], e2, 1)
    assert acquisition.lookahead_select(ids2, h2, e2, 2, exclude=set(ids2)) == []  # nothing eligible
    with pytest.raises(ValueError, match="at least 2 joint samples"):
        acquisition.lookahead_select(ids2, h2[:1], e2[:1], 1)
    with pytest.raises(ValueError, match="lookahead needs the screen's joint samples"):
        acquisition.select("lookahead", ids2, h2.mean(0), h2.std(0), 1)


def test_hull_distances_stable_entries_are_negative():
    comps = [Composition(c) for c in ("Li", "O", "Li2O", "LiO", "Li2O", "Li")]
    e = [0.0, 0.0, -2.0, -1.0, -1.9, 0.05]
    d = hull_distances(comps, e)
    # Li2O ground state: below the hull of the others (the 2nd Li2O at -1.9 is the nearest competitor)
    assert d[2] == pytest.approx(-0.1)
    assert d[4] == pytest.approx(0.1)            # the other polymorph sits 0.1 above
    assert d[3] == pytest.approx(0.5)  # LiO vs Li2O + O: hull at x_O = 1/2 is -1.5 eV/atom
    assert d[0] == pytest.approx(-0.05) and d[5] == pytest.approx(0.05)
    assert d[1] == 0.0                           # the only O phase: cannot be left out
    d2 = hull_distances(comps, [0.0, 0.0, -2.0, np.nan, -1.9, 0.05])
    assert np.isnan(d2[3]) and d2[2] == pytest.approx(-0.1)


def test_calibration_recovers_scale_and_coverage():
    rng = np.random.default_rng(0)
    sig = rng.uniform(0.01, 0.05, 4000)
    err = rng.normal(0, 3.0 * sig)
    cal = fit_scale(err, sig)
    assert cal.fitted and cal.s_ens == pytest.approx(3.0, rel=0.05)
    assert coverage(err, cal.sigma(sig), 0.9) == pytest.approx(0.9, abs=0.02)
    assert coverage(err, sig, 0.9) < 0.5  # uncalibrated: far too narrow
    assert not fit_scale([0.1, 0.2], [0.1, 0.1]).fitted
    curve = coverage_curve(err, cal.sigma(sig))
    assert all(abs(r["observed"] - r["level"]) < 0.03 for r in curve)


def test_gap_novelty_and_ensemble_stats(tmp_path):
    feats_train = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    gap_train = np.array([-0.5, -1.0, -0.75])
    dev, z = gap_novelty(np.array([-0.5, -0.2]), np.array([[1.0, 0.0], [1.0, 0.0]]), feats_train, gap_train, k=1)
    assert dev == pytest.approx([0.0, 0.3]) and z[1] == pytest.approx(0.3 / 0.005)
    nan_dev, _ = gap_novelty(np.array([0.1]), np.zeros((1, 2)), np.zeros((0, 2)), np.array([]))
    assert np.isnan(nan_dev[0])
    m, s = ensemble_stats(np.array([[1.0, 2.0], [3.0, 2.0]]))
    assert m == pytest.approx([2.0, 2.0]) and s == pytest.approx([np.sqrt(2), 0.0])
    png = plot_coverage({"test": coverage_curve([0.1, -0.2, 0.05], [0.1, 0.1, 0.1])}, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _gap_data(n: int, seed: int):
    """Compositions over 3 elements (a few polymorphs per composition) and a residual that is a large
    per-element shift + a smooth non-linear part + a per-structure deviation: what the loop's GP models."""
    rng = np.random.default_rng(seed)
    base = rng.dirichlet(np.ones(3), size=n // 2)
    x = np.repeat(base, 2, axis=0)[:n]
    smooth = 0.15 * np.sin(6 * x[:, 0]) * np.cos(5 * x[:, 2]) + 0.2 * x[:, 1] * x[:, 2]
    y = x @ np.array([-0.5, -6.0, -1.0]) + smooth + rng.normal(0, 0.01, n)
    return x, y


def test_gap_gp_beats_the_per_element_shift_and_covers():
    from pipeline.active.gap import BOUNDS, fit_gap_gp

    x, y = _gap_data(160, 0)
    tr, te = np.arange(0, 160, 2), np.arange(1, 160, 2)  # every composition's second polymorph held out
    gp = fit_gap_gp(x[tr], y[tr][None, :])
    assert gp.fitted and gp.n == 80
    for value, (lo, hi) in zip((gp.a, gp.length, gp.noise), BOUNDS):
        assert lo * (1 - 1e-6) <= value <= hi * (1 + 1e-6)
    mean, cov = gp.predict(x[tr], y[tr][None, :], x[te])
    err = mean[0] - y[te]
    coef, *_ = np.linalg.lstsq(x[tr], y[tr], rcond=None)
    err_shift = x[te] @ coef - y[te]
    assert np.abs(err).mean() < 0.5 * np.abs(err_shift).mean()
    assert 0.8 <= coverage(err, np.sqrt(np.diag(cov)), 0.9) <= 0.99
    # at a labelled point its residual is known
    same = (np.arange(3)[:, None] == np.arange(3)[None, :]).astype(float)
    m0, c0 = gp.predict(x[tr][:3], y[tr][None, :3], x[tr][:3], same)
    assert m0[0] == pytest.approx(y[tr][:3], abs=1e-6) and np.abs(np.diag(c0)).max() < 1e-6


def test_gap_gp_leave_one_out_is_exact_and_defaults_without_data():
    from pipeline.active.gap import DEFAULT, GapGP, fit_gap_gp

    x, y = _gap_data(20, 1)
    gp = GapGP(0.06, 0.2, 0.012)
    ys = np.stack([y, y + 0.01])  # two members
    err, std = gp.loo(x, ys)
    for i in (0, 7, 19):
        keep = np.arange(20) != i
        m, c = gp.predict(x[keep], ys[:, keep], x[i:i + 1])
        assert err[:, i] == pytest.approx(m[:, 0] - ys[:, i], abs=1e-8)
        assert std[i] == pytest.approx(np.sqrt(c[0, 0]), rel=1e-6)
    few = fit_gap_gp(x[:4], y[None, :4])  # 4 labels, 3 elements: nothing beyond the shift to fit
    assert not few.fitted and (few.a, few.length, few.noise) == DEFAULT


def test_fit_scale_prior_and_held_out():
    """The prior's weight (the plain maximum-likelihood scale: test_calibration_recovers_scale_and_coverage)."""
    # a prior worth 10 observations at s = 1 against 10 held-out errors at z = 2: s^2 = (10 + 40) / 20
    weighted = fit_scale(np.full(10, 0.2), np.full(10, 0.1), prior_dof=10)
    assert weighted.s_ens == pytest.approx(np.sqrt(2.5)) and weighted.prior_dof == 10
    assert fit_scale([], [], prior_dof=5).s_ens == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        fit_scale([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="prior_dof"):
        fit_scale([0.1], [0.1], prior_dof=-1)


def test_gap_gp_length_prior_pulls_towards_its_median():
    from pipeline.active.gap import BOUNDS, LENGTH_PRIOR, _nll, fit_gap_gp

    x, y = _gap_data(10, 4)
    free = fit_gap_gp(x, y[None, :], length_prior=None)
    pulled = fit_gap_gp(x, y[None, :])
    median = LENGTH_PRIOR[0]
    assert abs(np.log(pulled.length / median)) <= abs(np.log(free.length / median)) + 1e-9
    # on these 10 labels maximum likelihood alone runs to the lower bound of l; the prior keeps it off
    assert free.length == pytest.approx(BOUNDS[1][0], rel=0.05) and pulled.length > 2 * BOUNDS[1][0]
    theta = np.log([0.05, 0.05, 0.01])
    # the prior adds 0.5 ((ln l - ln median) / sd)^2 to the negative log likelihood
    extra = _nll(theta, x, y[None, :], LENGTH_PRIOR) - _nll(theta, x, y[None, :])
    assert extra == pytest.approx(0.5 * (np.log(0.05 / median) / LENGTH_PRIOR[1]) ** 2)
