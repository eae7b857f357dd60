"""EHR features: observations -> ``EhrVector`` -> model input, and the schema hash.

``EhrVector.values`` holds one number per feature in ``FEATURES`` order: numeric values as given,
binary and categorical ones as the index into ``FeatureSpec.categories`` (sex F=0/M=1, ocb NEG=0/POS=1,
dmt = index into ``DMT_CATEGORIES``). The model input expands categoricals to one-hot columns,
log-transforms skewed timed tests and NfL, standardises with training statistics and appends the
presence mask: ``[values (n_cols), present (n_cols)]``. Missing values are 0 after standardisation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from msgate.model.features import FEATURES, FeatureSpec
from msgate.model.types import EhrVector

LOG_FEATURES: frozenset[str] = frozenset({"t25fw", "nhpt", "nfl", "igg_index"})


def schema_hash() -> str:
    """SHA-256 over the feature names, codes, units, kinds and categories (checkpoint compatibility)."""
    spec = [[f.name, [list(c) for c in f.codes], f.unit, f.kind, list(f.categories)] for f in FEATURES]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def columns() -> list[tuple[str, int | None]]:
    """Model-input columns as (feature name, category index or None)."""
    out: list[tuple[str, int | None]] = []
    for f in FEATURES:
        if f.kind == "categorical":
            out.extend((f.name, i) for i in range(len(f.categories)))
        else:
            out.append((f.name, None))
    return out


N_COLUMNS = len(columns())


def _encode_value(spec: FeatureSpec, value: object) -> float:
    if spec.kind == "numeric":
        return float(value)  # type: ignore[arg-type]
    return float(spec.categories.index(str(value)))


def ehr_vector(values: Mapping[str, object]) -> EhrVector:
    """An ``EhrVector`` from a name -> raw value mapping (absent names are missing)."""
    vals = np.zeros(len(FEATURES), np.float32)
    present = np.zeros(len(FEATURES), bool)
    for i, spec in enumerate(FEATURES):
        if spec.name in values and values[spec.name] is not None:
            vals[i] = _encode_value(spec, values[spec.name])
            present[i] = True
    return EhrVector(vals, present, tuple(f.name for f in FEATURES))


def raw_columns(ehr: EhrVector) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Unstandardised column values and column presence for one vector."""
    if tuple(ehr.names) != tuple(f.name for f in FEATURES):
        raise ValueError("EhrVector.names does not follow model.features.FEATURES; rebuild the vector.")
    x = np.zeros(N_COLUMNS, np.float32)
    m = np.zeros(N_COLUMNS, np.float32)
    j = 0
    for i, spec in enumerate(FEATURES):
        width = len(spec.categories) if spec.kind == "categorical" else 1
        if ehr.present[i]:
            v = float(ehr.values[i])
            if spec.kind == "categorical":
                x[j + int(v)] = 1.0
            else:
                x[j] = np.log1p(max(v, 0.0)) if spec.name in LOG_FEATURES else v
            m[j:j + width] = 1.0
        j += width
    return x, m


class EhrScaler:
    """Per-column mean/std fitted on the training split (present values only)."""

    def __init__(self, mean: NDArray[np.float32], std: NDArray[np.float32]) -> None:
        self.mean = mean.astype(np.float32)
        self.std = std.astype(np.float32)

    @classmethod
    def fit(cls, x: NDArray[np.float32], m: NDArray[np.float32]) -> EhrScaler:
        """Fit on stacked raw columns ``x`` and presence ``m`` ([n, N_COLUMNS])."""
        cnt = np.maximum(m.sum(0), 1.0)
        mean = (x * m).sum(0) / cnt
        var = (((x - mean) * m) ** 2).sum(0) / cnt
        return cls(mean, np.sqrt(np.maximum(var, 1e-6)))

    def transform(self, x: NDArray[np.float32], m: NDArray[np.float32]) -> NDArray[np.float32]:
        """Standardised values (0 where missing) concatenated with the mask, [..., 2 * N_COLUMNS]."""
        z = np.clip((x - self.mean) / self.std, -5.0, 5.0) * m
        return np.concatenate([z, m], axis=-1).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready dict."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, list[float]]) -> EhrScaler:
        """Inverse of ``to_dict``."""
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))


def missing_flags(ehr: EhrVector) -> list[str]:
    """``ehr_missing:<name>`` for each absent feature."""
    return [f"ehr_missing:{name}" for name, p in zip(ehr.names, ehr.present) if not p]
