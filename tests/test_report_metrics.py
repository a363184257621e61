"""E_hull metrics with matbench-discovery's definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.report.metrics import classify_stable, regression_metrics, stable_metrics


def test_hand_computed_example():
    e_true = [-0.05, 0.0, 0.02, 0.2, None]  # the last has no DFT value: not counted
    e_pred = [-0.01, 0.05, -0.02, 0.3, 0.0]
    assert classify_stable(e_true, e_pred) == (1, 1, 1, 1)  # TP, FN, FP, TN
    m = stable_metrics(e_true, e_pred)
    assert m["n"] == 4 and m["prevalence"] == 0.5
    assert m["Precision"] == m["Recall"] == m["F1"] == m["Accuracy"] == 0.5
    assert m["DAF"] == pytest.approx(1.0)
    assert m["TPR"] == m["FPR"] == m["TNR"] == m["FNR"] == 0.5
    assert m["MAE"] == pytest.approx((0.04 + 0.05 + 0.04 + 0.1) / 4)
    assert m["RMSE"] == pytest.approx(math.sqrt((0.04**2 + 0.05**2 + 0.04**2 + 0.1**2) / 4))


def test_threshold_moves_the_classes():
    e_true, e_pred = [0.03, 0.08, 0.2], [0.04, 0.2, 0.09]
    assert classify_stable(e_true, e_pred, 0.0) == (0, 0, 0, 3)
    assert classify_stable(e_true, e_pred, 0.1) == (1, 1, 1, 0)
    m = stable_metrics(e_true, e_pred, 0.1)
    assert m["stability_threshold"] == 0.1 and m["DAF"] == pytest.approx(0.5 / (2 / 3))


def test_missing_prediction_counts_as_unstable_and_nan_ratios():
    m = stable_metrics([-0.1, 0.1], [None, 0.2])
    assert (m["TP"], m["FN"], m["FP"], m["TN"], m["n_missing_pred"]) == (0, 1, 0, 1, 1)
    assert math.isnan(m["Precision"]) and m["Recall"] == 0 and math.isnan(m["DAF"])
    assert m["MAE"] == pytest.approx(0.1) and math.isnan(m["R2"])  # one pair only
    with pytest.raises(ValueError, match="threshold"):
        stable_metrics([0.0], [0.0], float("nan"))
    with pytest.raises(ValueError, match="values"):
        classify_stable([0.0], [0.0, 1.0])


def test_agrees_with_sklearn_on_random_data():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    e_true = rng.normal(0.05, 0.1, 300)
    e_pred = e_true + rng.normal(0, 0.05, 300)
    m = stable_metrics(list(e_true), list(e_pred), 0.02)
    y_true, y_pred = e_true <= 0.02, e_pred <= 0.02
    assert m["Precision"] == pytest.approx(sk.precision_score(y_true, y_pred))
    assert m["Recall"] == pytest.approx(sk.recall_score(y_true, y_pred))
    assert m["F1"] == pytest.approx(sk.f1_score(y_true, y_pred))
    assert m["Accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
    assert m["R2"] == pytest.approx(sk.r2_score(e_true, e_pred))
    tn, fp, fn, tp = sk.confusion_matrix(y_true, y_pred).ravel()
    assert m["FPR"] == pytest.approx(fp / (fp + tn)) and m["FNR"] == pytest.approx(fn / (fn + tp))
    assert m["TNR"] == pytest.approx(1 - m["FPR"]) and m["TPR"] == m["Recall"]
    assert m["DAF"] == pytest.approx(m["Precision"] / y_true.mean())
    assert all(math.isnan(v) for v in regression_metrics([], []).values())


finite = st.floats(-1.0, 1.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), finite), st.one_of(st.none(), finite)), max_size=40),
       st.sampled_from([0.0, 0.05, -0.01]))
def test_counts_and_ratios_are_consistent(pairs, threshold):
    e_true = [t for t, _ in pairs]
    e_pred = [p for _, p in pairs]
    m = stable_metrics(e_true, e_pred, threshold)
    assert m["TP"] + m["FN"] + m["FP"] + m["TN"] == m["n"] == sum(t is not None for t in e_true)
    if m["TP"] + m["FP"] > 0 and m["TP"] + m["FN"] > 0:
        assert m["DAF"] == pytest.approx(m["Precision"] / m["prevalence"])
        assert 0 <= m["Precision"] <= 1 and 0 <= m["Recall"] <= 1
    if not math.isnan(m["MAE"]):
        assert m["MAE"] <= m["RMSE"] + 1e-12
