"""The worker model plug-in ``msgate.model.he_worker``: same contract as ``predict``, EHR outputs via CKKS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from msgate.model import he
from msgate.model import predict as plain_predict
from msgate.model.he_keys import HeKeys
from msgate.model.he_worker import HePatientModel, HeWorker, predict
from msgate.model.patient import presets
from msgate.model.patient.checkpoint import PatientCheckpoint
from msgate.model.patient.ehr import N_COLUMNS, EhrScaler, ehr_vector
from msgate.model.patient.lesionsrc import HeuristicLesions
from msgate.model.patient.network import PatientNet
from msgate.model.types import Case, Volume
from msgate.storage import keyring

MICRO = presets.Preset("micro", (16, 16, 16), 12.0, (4, 4, 8, 8), (1, 1, 1, 1), 16, 32, 16, 0.2, 1, 2, 1e-3, 1,
                       "encoder.layer3")


def _case(case_id: str, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    shape = (20, 24, 22)
    k, r, c = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    data = np.where((k**2 + r**2 + c**2) < 0.7, 400.0, 0.0) + rng.normal(0, 5, shape)
    data[(k - 0.2) ** 2 + (r - 0.1) ** 2 + c**2 < 0.02] = 900.0
    aff = np.diag([-5.0, -5.0, 5.0, 1.0])
    ehr = ehr_vector({"age": 30.0 + seed, "sex": "F", "sdmt": 40 + seed, "nfl": 5.0 + seed, "dmt": "none"})
    return Case(case_id, {"FLAIR": Volume(data.astype(np.float32), aff, "FLAIR")}, ehr)


def test_he_predict_matches_plaintext_predict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-member ensemble: HE predict gets cases *without* EHR; the (in-process) key service holds it."""
    import dataclasses

    from msgate.model.he_service import LocalKeyService, model_spec
    from msgate.model.patient.ehr import raw_columns

    monkeypatch.setitem(presets.PRESETS, "micro", MICRO)
    torch.manual_seed(0)
    nets = [PatientNet(MICRO).eval() for _ in range(2)]
    scaler = EhrScaler(np.zeros(N_COLUMNS, np.float32), np.ones(N_COLUMNS, np.float32))
    meta = {"preset": "micro", "preset_config": MICRO.to_dict(), "temperature_edss": 1.3, "temperature_ms": 1.1}
    ckpt = PatientCheckpoint(nets, scaler, meta)
    pm = plain_predict.PatientModel(ckpt, HeuristicLesions())
    keys = HeKeys(tmp_path, keyring.init(tmp_path / "keys" / "keyring.json"))
    keys.generate(he.HeParams())
    cases = [_case(f"c{i}", i) for i in range(3)]
    ehr = {c.case_id: scaler.transform(*raw_columns(c.ehr)) for c in cases}  # the trusted side's copy
    spec = model_spec(ckpt)
    service = LocalKeyService(keys, spec, lambda ids: np.stack([ehr[i] for i in ids]).astype(np.float64))
    model = HePatientModel(pm, HeWorker.for_home(he.export(nets), tmp_path), service, spec.fingerprint)
    got = predict([dataclasses.replace(c, ehr=None) for c in cases], model)
    want = plain_predict.predict(cases, pm)
    for g, w in zip(got, want, strict=True):
        assert "he" in g.flags and g.case_id == w.case_id
        assert np.abs(np.subtract(g.edss_probabilities, w.edss_probabilities)).max() <= 1e-3
        assert abs(g.p_ms - w.p_ms) <= 1e-3 and g.edss_estimate == w.edss_estimate
        assert g.edss_class == w.edss_class and g.ehr_contributions == {}
        assert g.heatmap is not None and g.heatmap.shape == cases[0].flair.data.shape
    with pytest.raises(ValueError, match="no EHR"):  # the plaintext model refuses a case without EHR
        plain_predict.predict([dataclasses.replace(cases[0], ehr=None)], pm)
    wrong = HePatientModel(pm, model.worker, service, "another-model")
    with pytest.raises(Exception, match="fingerprint"):
        predict([dataclasses.replace(cases[0], ehr=None)], wrong)


def test_runtime_uses_the_he_plugin_only_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    from msgate.config import load_settings
    from msgate.workers.runtime import import_model_module

    assert import_model_module(load_settings()).__name__ == "msgate.model.predict"
    monkeypatch.setenv("MSGATE_HE__ENABLED", "1")
    assert import_model_module(load_settings()).__name__ == "msgate.model.he_worker"
    monkeypatch.setenv("MSGATE_WORKERS__MODEL_MODULE", "msgate.model.predict_custom")
    assert load_settings().workers.model_module == "msgate.model.predict_custom"  # an explicit choice wins
