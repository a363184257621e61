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
    fit_calibration,
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
    cal = fit_calibration(err, sig)
    assert cal.fitted and cal.s_ens == pytest.approx(3.0, rel=0.05)
    assert coverage(err, cal.sigma(sig), 0.9) == pytest.approx(0.9, abs=0.02)
    assert coverage(err, sig, 0.9) < 0.5  # uncalibrated: far too narrow
    # a second variance term from the gap deviation
    gdev = rng.uniform(0, 0.1, 4000)
    err2 = rng.normal(0, np.sqrt((2 * sig) ** 2 + (0.5 * gdev) ** 2))
    cal2 = fit_calibration(err2, sig, gdev)
    assert cal2.s_ens == pytest.approx(2.0, rel=0.15) and cal2.s_gap == pytest.approx(0.5, rel=0.15)
    assert not fit_calibration([0.1, 0.2], [0.1, 0.1]).fitted
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
