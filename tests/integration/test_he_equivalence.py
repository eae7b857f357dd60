"""Equivalence on held-out synthetic cases: the full HE path (key service encrypt + MAC -> worker with the
public context only -> key service verify + decrypt + softmax/temperature) against the plaintext network.

Model: the shipped patient checkpoint when it exists; otherwise a randomly initialised multimodal
``PatientNet`` of the real architecture (tiny preset), which tests the HE math, not the trained weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from msgate.model import he
from msgate.model.he_keys import HeKeys
from msgate.model.he_worker import HeWorker
from msgate.model.patient.calibration import sigmoid, softmax
from msgate.storage import keyring

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _model() -> tuple[object, he.HeModel, float, float]:
    from msgate.model.patient import checkpoint

    if checkpoint.DEFAULT_PATH.is_file():
        ck = checkpoint.load()
        return ck.net, he.export(ck.net), ck.t_edss, ck.t_ms
    net, model = he.random_model(seed=11)
    return net, model, 1.0, 1.0


@pytest.mark.parametrize(("n_cases", "max_batch"), [(200, 16), (24, 1)])
def test_he_matches_plaintext(tmp_path: Path, n_cases: int, max_batch: int) -> None:
    net, model, t_edss, t_ms = _model()
    keys = HeKeys(tmp_path, keyring.init(tmp_path / "keys" / "keyring.json"))
    keys.generate(he.HeParams())
    worker = HeWorker.for_home(model, tmp_path)
    u, z = he.synthetic_inputs(n_cases, (model.n_features - 1) // 2, model.gate_w.shape[1], seed=2026)
    ids = [f"case-{i}" for i in range(n_cases)]
    got: dict[str, dict[str, object]] = {}
    for pack in keys.encrypt(u, ids, max_batch=max_batch):
        rows = [ids.index(c) for c in pack.case_ids]
        for out in keys.finalize(worker.evaluate(pack, z[rows]), t_edss=t_edss, t_ms=t_ms):
            got[str(out["case_id"])] = out
    plain = he._torch_logits(net, u, z)  # type: ignore[arg-type]
    p_plain, ms_plain = softmax(plain[:, :4], t_edss), sigmoid(plain[:, 5], t_ms)
    p_he = np.asarray([got[c]["edss_probabilities"] for c in ids])
    ms_he = np.asarray([got[c]["p_ms"] for c in ids])
    assert len(got) == n_cases
    assert (p_he.argmax(1) == p_plain.argmax(1)).mean() == 1.0
    assert np.abs(p_he - p_plain).max() <= 1e-3
    assert np.abs(ms_he - ms_plain).max() <= 1e-3
    assert np.abs(np.asarray([got[c]["edss"] for c in ids]) - plain[:, 4]).max() <= 1e-3
