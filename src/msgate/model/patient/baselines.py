"""Classical baselines: random forest on EHR + lesion-model features, and the reference model.

The reference model sees what no real pipeline sees: the generator's true lesion load and count, the
true Rim+ count and the complete (never missing) EHR values. It bounds what the observable channels
can reach. Both use scikit-learn random forests (classifier for the EDSS bin, regressor for the EDSS,
classifier for MS vs cSVD), with fixed seeds; missing EHR values are imputed by the training mean
and the missingness mask is appended.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

from msgate.model.patient.train import Data


def _impute(x: NDArray[np.float32], m: NDArray[np.float32], mean: NDArray[np.float32]) -> NDArray[np.float32]:
    return np.where(m > 0, x, mean[None, :]).astype(np.float32)


def rf_features(d: Data, mean: NDArray[np.float32]) -> NDArray[np.float32]:
    """EHR (imputed) + mask + lesion-model features."""
    return np.concatenate([_impute(d.ehr_x, d.ehr_m, mean), d.ehr_m, d.lesion], axis=1)


def reference_features(raw: dict[str, NDArray[Any]]) -> NDArray[np.float32]:
    """True lesion load (log), count, Rim+ count and complete EHR values."""
    return np.concatenate([np.log1p(raw["true_load"])[:, None], np.log1p(raw["true_count"])[:, None],
                           np.log1p(raw["n_rim"])[:, None], raw["true_ehr"]], axis=1).astype(np.float32)


def fit_predict_rf(x_tr: NDArray[np.float32], d_tr: Data, x_te: NDArray[np.float32], seed: int = 0
                   ) -> dict[str, NDArray[np.float64]]:
    """Fit the three forests and return test probabilities and estimates."""
    kw: dict[str, Any] = {"n_estimators": 300, "min_samples_leaf": 2, "random_state": seed, "n_jobs": 1}
    cls = RandomForestClassifier(class_weight="balanced", **kw).fit(x_tr, d_tr.edss_class)
    reg = RandomForestRegressor(**kw).fit(x_tr, d_tr.edss)
    ms = RandomForestClassifier(**kw).fit(x_tr, d_tr.ms.astype(int))
    probs = np.zeros((len(x_te), 4))
    probs[:, cls.classes_] = cls.predict_proba(x_te)
    return {"edss_probs": probs, "edss": reg.predict(x_te), "p_ms": ms.predict_proba(x_te)[:, 1]}
