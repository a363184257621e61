"""Stability-classification and regression metrics of predicted E_hull, with matbench-discovery's definitions.

Written here because matbench-discovery (which defines them in ``metrics/discovery.py: stable_metrics``) is a
benchmark package with heavy data dependencies, not a library to import; the definitions are the same:

* truly stable: ``e_true <= threshold``; predicted stable: ``e_pred <= threshold``; a missing prediction
  (NaN/None) counts as predicted UNSTABLE;
* Precision = TP/(TP+FP), Recall = TPR = TP/(TP+FN), FPR = FP/(FP+TN), TNR = TN/(TN+FP), FNR = FN/(FN+TP),
  F1, Accuracy = (TP+TN)/n, prevalence = (TP+FN)/n, DAF = Precision / prevalence;
* MAE, RMSE, R2 over the candidates that have both values (R2 = 1 - SS_res/SS_tot).
Undefined ratios (0/0) are NaN. Keys are spelled as matbench-discovery prints them (F1, DAF, Precision, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def _as_float_array(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def classify_stable(
    e_true: Sequence[float | None], e_pred: Sequence[float | None], threshold: float = 0.0
) -> tuple[int, int, int, int]:
    """(TP, FN, FP, TN) counts over candidates with a known ``e_true``; missing predictions = unstable."""
    if len(e_true) != len(e_pred):
        raise ValueError(f"e_true has {len(e_true)} values, e_pred {len(e_pred)}")
    if threshold is None or not math.isfinite(threshold):
        raise ValueError("stability threshold must be a finite number (eV/atom)")
    t, p = _as_float_array(e_true), _as_float_array(e_pred)
    known = ~np.isnan(t)
    t, p = t[known], p[known]
    actual = t <= threshold
    predicted = np.where(np.isnan(p), False, p <= threshold)
    return (int(np.sum(actual & predicted)), int(np.sum(actual & ~predicted)),
            int(np.sum(~actual & predicted)), int(np.sum(~actual & ~predicted)))


def regression_metrics(e_true: Sequence[float | None], e_pred: Sequence[float | None]) -> dict[str, float]:
    """MAE, RMSE, R2 over pairs where both values are known."""
    t, p = _as_float_array(e_true), _as_float_array(e_pred)
    both = ~np.isnan(t) & ~np.isnan(p)
    t, p = t[both], p[both]
    if len(t) == 0:
        return {"MAE": float("nan"), "RMSE": float("nan"), "R2": float("nan")}
    err = p - t
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    r2 = 1.0 - float(np.sum(err**2)) / ss_tot if len(t) > 1 and ss_tot > 0 else float("nan")
    return {"MAE": float(np.mean(np.abs(err))), "RMSE": float(np.sqrt(np.mean(err**2))), "R2": r2}


def stable_metrics(
    e_true: Sequence[float | None], e_pred: Sequence[float | None], threshold: float = 0.0
) -> dict[str, float]:
    """Classification (Precision, Recall, F1, Accuracy, DAF, TPR/FPR/TNR/FNR, counts) and regression (MAE, RMSE,
    R2) metrics."""
    tp, fn, fp, tn = classify_stable(e_true, e_pred, threshold)
    n = tp + fn + fp + tn
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    prevalence = _ratio(tp + fn, n)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else float("nan")
    t = _as_float_array(e_true)
    missing = int(np.sum(~np.isnan(t) & np.isnan(_as_float_array(e_pred))))
    return {
        "stability_threshold": float(threshold), "n": n, "n_missing_pred": missing, "prevalence": prevalence,
        "F1": f1, "DAF": _ratio(precision, prevalence) if not math.isnan(prevalence) else float("nan"),
        "Precision": precision, "Recall": recall, "Accuracy": _ratio(tp + tn, n),
        "TPR": recall, "FPR": _ratio(fp, fp + tn), "TNR": _ratio(tn, tn + fp), "FNR": _ratio(fn, fn + tp),
        "TP": tp, "FP": fp, "TN": tn, "FN": fn,
        **regression_metrics(e_true, e_pred),
    }
