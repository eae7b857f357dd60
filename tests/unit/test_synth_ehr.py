"""EHR generator: only schema features (never Kurtzke FS scores), dated before the scan, missingness."""

from __future__ import annotations

from datetime import date

import numpy as np

from msgate.model.features import EDSS_LABEL, FEATURES, FeatureSpec
from msgate.model.synth.ehr import sample_ehr, true_values
from msgate.model.synth.latent import EDSS_STEPS, sample_latent

FS_WORDS = ("pyramidal", "cerebellar", "brainstem", "sensory", "bowel", "bladder", "visual", "cerebral",
            "ambulation", "coordination", "motor_system", "gait", "kfs", "fs_")


def _subjects(n: int, missing_rate: float):
    rng = np.random.default_rng(0)
    for i in range(n):
        lat = sample_latent("ms" if i % 3 else "csvd", rng)
        yield lat, sample_ehr(lat, date(2026, 1, 5), missing_rate, rng)


def test_feature_schema_is_frozen_and_excludes_label() -> None:
    names = [f.name for f in FEATURES]
    assert names == ["age", "sex", "disease_duration", "t25fw", "nhpt", "sdmt", "nfl", "ocb", "igg_index",
                     "relapses_2y", "dmt"]
    assert EDSS_LABEL.name not in names
    assert all(isinstance(f, FeatureSpec) and f.codes for f in FEATURES)
    codes = {f.name: f.primary_code for f in FEATURES}
    assert codes["nfl"] == ("101281-4", "LN") and codes["ocb"] == ("49852-7", "LN")
    assert codes["igg_index"] == ("14117-6", "LN")


def test_never_emits_functional_system_scores() -> None:
    allowed = {f.name for f in FEATURES}
    for lat, obs in _subjects(200, 0.0):
        keys = {o.name for o in obs} | set(true_values(lat, np.random.default_rng(1)))
        assert keys <= allowed
        assert not any(w in k.lower() for k in keys for w in FS_WORDS)


def test_values_dated_before_scan_and_plausible() -> None:
    for lat, obs in _subjects(100, 0.0):
        assert lat.edss in EDSS_STEPS
        for o in obs:
            assert o.when < date(2026, 1, 5)
        v = {o.name: o.value for o in obs}
        assert 0 <= v["sdmt"] <= 110 and v["nfl"] > 0 and v["ocb"] in ("POS", "NEG")


def test_missing_rate_controls_missingness() -> None:
    full = sum(len(obs) for _, obs in _subjects(200, 0.0))
    some = sum(len(obs) for _, obs in _subjects(200, 0.2))
    assert some < 0.9 * full
    for _, obs in _subjects(50, 0.5):
        assert {"age", "sex"} <= {o.name for o in obs}


def test_severity_moves_functional_tests() -> None:
    pairs = [(lat.severity, {o.name: o.value for o in obs}) for lat, obs in _subjects(300, 0.0)]
    sev = np.array([s for s, _ in pairs])
    sdmt = np.array([float(v["sdmt"]) for _, v in pairs])
    assert np.corrcoef(sev, sdmt)[0, 1] < -0.3
