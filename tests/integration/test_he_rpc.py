"""The key service's RPC over the real embedded broker (kombu SQLAlchemy transport on SQLite): the worker
side holds only the public context; encrypt and verify/decrypt/softmax happen in the keys role."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from msgate.config import Settings, load_settings
from msgate.errors import TamperedData
from msgate.model import he
from msgate.model.he_keys import HeKeys, serve
from msgate.model.he_worker import BrokerKeyClient, HeWorker
from msgate.storage import keyring

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Settings, HeKeys]]:
    settings = load_settings(home=tmp_path, he={"enabled": True})
    keys = HeKeys(tmp_path, keyring.init(tmp_path / "keys" / "keyring.json"))
    keys.generate(he.HeParams())
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve, args=(keys, settings, stop), kwargs={"ready": ready}, daemon=True)
    thread.start()
    assert ready.wait(30)
    yield settings, keys
    stop.set()
    thread.join(10)


def test_rpc_round_trip_and_tamper_detection(service: tuple[Settings, HeKeys]) -> None:
    settings, _ = service
    _, model = he.random_model(seed=21)
    worker = HeWorker.for_home(model, settings.home)
    client = BrokerKeyClient(settings, timeout=60)
    u, z = he.synthetic_inputs(5, (model.n_features - 1) // 2, model.gate_w.shape[1], seed=21)
    ids = [f"j{i}" for i in range(5)]
    (pack,) = client.encrypt(u, ids, max_batch=8)
    ctx, _, _ = worker.keys.get(pack.key_id)
    assert not ctx.is_private()
    res = worker.evaluate(pack, z)
    outcomes = client.finalize(res, t_edss=1.2, t_ms=0.9)
    from msgate.model.patient.calibration import softmax

    want = softmax(model.plain_logits(u, z)[:, :4], 1.2)
    got = np.asarray([o["edss_probabilities"] for o in outcomes])
    assert [o["case_id"] for o in outcomes] == ids
    assert np.abs(got - want).max() <= 1e-3
    forged = dataclasses.replace(res, case_ids=tuple(reversed(res.case_ids)))
    with pytest.raises(TamperedData):
        client.finalize(forged)
