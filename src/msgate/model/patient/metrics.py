"""Metrics with percentile-bootstrap 95 % intervals (patients resampled with replacement)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from msgate.model.patient.calibration import ece

Arr = NDArray[np.float64]


def edss_bal_acc(y: Arr, probs: Arr) -> float:
    """Balanced accuracy of the EDSS bin (argmax)."""
    return float(balanced_accuracy_score(y.astype(int), probs.argmax(1)))


def mae(y: Arr, est: Arr) -> float:
    """Mean absolute error in EDSS points."""
    return float(np.mean(np.abs(y - est)))


def auc(y: Arr, p: Arr) -> float:
    """ROC-AUC; NaN when one class is absent in the resample."""
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def ece_multi(y: Arr, probs: Arr) -> float:
    """Top-label ECE (15 bins)."""
    return ece(probs, y.astype(int))


def ece_floor(probs: Arr, n_draws: int = 200, seed: int = 0) -> dict[str, float]:
    """What the same ECE estimator gives for a *perfectly calibrated* model with these predicted
    probabilities and this many patients: labels redrawn from the probabilities themselves
    (consistency resampling, Broecker & Smith 2007). Mean and 95th percentile over ``n_draws``. An
    observed ECE inside this range is what estimator noise alone produces."""
    rng = np.random.default_rng(seed)
    cum = np.cumsum(np.asarray(probs, np.float64), axis=1)
    vals = []
    for _ in range(n_draws):
        y = (rng.random((len(cum), 1)) > cum).sum(1).clip(0, cum.shape[1] - 1)
        vals.append(ece(probs, y))
    return {"mean": round(float(np.mean(vals)), 4), "p95": round(float(np.percentile(vals, 95)), 4)}


def ece_binary(y: Arr, p: Arr) -> float:
    """ECE of the binary MS probability, as a two-class top-label ECE."""
    return ece(np.stack([1 - p, p], 1), y.astype(int))


def bootstrap(fn: Callable[..., float], *arrays: NDArray[np.floating], n: int = 1000, seed: int = 0
              ) -> dict[str, float]:
    """Point estimate and 2.5 / 97.5 percentiles of ``fn`` over patient resamples."""
    rng = np.random.default_rng(seed)
    m = len(arrays[0])
    point = fn(*arrays)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, m, m)
        v = fn(*(a[idx] for a in arrays))
        if np.isfinite(v):
            vals.append(v)
    lo, hi = (np.percentile(vals, [2.5, 97.5]) if vals else (float("nan"), float("nan")))
    return {"value": round(float(point), 4), "ci_low": round(float(lo), 4), "ci_high": round(float(hi), 4)}


def summary(y_cls: Arr, y_edss: Arr, y_ms: Arr, probs: Arr, est: Arr, p_ms: Arr, n: int = 1000) -> dict[str, dict[str, float]]:
    """The standard metric block of one model."""
    return {
        "edss_balanced_accuracy": bootstrap(edss_bal_acc, y_cls, probs, n=n),
        "edss_mae": bootstrap(mae, y_edss, est, n=n),
        "edss_ece": bootstrap(ece_multi, y_cls, probs, n=n),
        "ms_auc": bootstrap(auc, y_ms, p_ms, n=n),
        "ms_ece": bootstrap(ece_binary, y_ms, p_ms, n=n),
    }


def paired_difference(fn: Callable[..., float], y: NDArray[np.floating], a: NDArray[np.floating],
                      b: NDArray[np.floating], n: int = 1000, seed: int = 0) -> dict[str, float]:
    """``fn(y, a) - fn(y, b)`` with a percentile-bootstrap 95 % interval over the *same* patient
    resamples for both models (paired): whether model a beats model b beyond resampling noise."""
    rng = np.random.default_rng(seed)
    m = len(y)
    point = fn(y, a) - fn(y, b)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, m, m)
        vals.append(fn(y[idx], a[idx]) - fn(y[idx], b[idx]))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return {"value": round(float(point), 4), "ci_low": round(float(lo), 4), "ci_high": round(float(hi), 4)}
