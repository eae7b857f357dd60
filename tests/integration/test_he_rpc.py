"""The key service's RPC over the real embedded broker (kombu SQLAlchemy transport on SQLite): the worker
side holds only the public context and sends job ids; the key service reads the EHR, encrypts, and
verifies, decrypts and calibrates the result."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from msgate.config import Settings, load_settings
from msgate.errors import Rejected, TamperedData
from msgate.model import he
from msgate.model.he_keys import HeKeys
from msgate.model.he_rpc import REQUEST_QUEUE, BrokerKeyClient, serve
from msgate.model.he_worker import HeWorker
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


def test_finalize_over_the_broker_and_tamper_detection(service: tuple[Settings, HeKeys]) -> None:
    settings, keys = service
    _, model = he.random_model(seed=21, members=3)
    worker = HeWorker.for_home(model, settings.home)
    client = BrokerKeyClient(settings, timeout=60)
    u, z = he.synthetic_inputs(5, model, seed=21)
    ids = [f"j{i}" for i in range(5)]
    (pack,) = keys.encrypt(u, ids, widths=model.widths, max_batch=8)
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
    # there is no way to hand plaintext EHR values to the key service over the broker
    with pytest.raises(Rejected, match="unknown op"):
        client._call({"op": "encrypt", "u": u.tolist(), "case_ids": ids})
    assert REQUEST_QUEUE == "msgate.he-keys"


def test_encrypt_jobs_reads_the_ehr_on_the_trusted_side(tmp_path: Path) -> None:
    """The worker sends job ids only; the key service builds the EHR input from storage, audits, encrypts."""
    import tenseal as ts
    import test_workers_double as double  # tests/integration helpers (real store, real scheduler)
    from conftest import make_settings
    from sqlmodel import select

    from msgate.model.he_service import AUDIT_KIND, JobSource, ModelSpec, job_inputs
    from msgate.model.patient.ehr import N_COLUMNS, columns
    from msgate.storage.models import AuditEvent
    from msgate.storage.store import open_store
    from msgate.workers.celery_app import build_app
    from msgate.workers.scheduler import Scheduler

    settings = make_settings(tmp_path / "home", "sqlite", he={"enabled": True},
                             workers={"model_module": "test_workers_double", "ehr_deadline_seconds": 0,
                                      "required_ehr_fields": []})
    store = open_store(settings)
    stop, ready = threading.Event(), threading.Event()
    try:
        double.make_study(store, seed=3)
        double.add_patient(store, mrn="MRN00003", nfl=12.0, sex="M")
        [job_id] = Scheduler(store, build_app(settings)).scan()
        from msgate.storage.models import Job

        with store.db.session() as session:  # a worker's claim: only a running job gets HE inputs
            job = session.get(Job, job_id)
            assert job is not None
            job.state, job.attempts = "running", 1
        keys = HeKeys(settings.home, store.ring)
        keys.generate(he.HeParams())
        spec = ModelSpec((0.0,) * N_COLUMNS, (1.0,) * N_COLUMNS, (32, 32, 32))
        jobs = JobSource(store, _spec=spec, actor="keys-test")
        thread = threading.Thread(target=serve, args=(keys, settings, stop), kwargs={"ready": ready, "jobs": jobs},
                                  daemon=True)
        thread.start()
        assert ready.wait(30)
        client = BrokerKeyClient(settings, timeout=60)
        (pack,) = client.encrypt_jobs([job_id], model=spec.fingerprint)
        assert pack.case_ids == (job_id,) and pack.layout.hidden == 96  # one case: all members in one group
        with store.db.session() as session:
            events = session.exec(select(AuditEvent).where(AuditEvent.kind == AUDIT_KIND)).all()
        assert [(e.actor, e.subject, e.detail["ehr"]) for e in events] == [("keys-test", f"job:{job_id}", True)]
        # what the key service encrypted: the stored EHR (NfL 12 pg/mL, sex M), standardised, mask appended
        u = job_inputs(store, [job_id], spec, actor="keys-test")
        cols = columns()
        nfl, sex = cols.index(("nfl", None)), cols.index(("sex", None))
        assert u[0, N_COLUMNS + nfl] == 1.0 and u[0, nfl] == pytest.approx(np.log1p(12.0), rel=1e-5)
        assert u[0, N_COLUMNS + sex] == 1.0 and u[0, sex] == 1.0
        lay = pack.layout
        slots = np.asarray(ts.ckks_vector_from(keys._secret(pack.key_id).ctx, pack.ciphertexts[0]).decrypt())
        first = slots.reshape(lay.blocks, lay.lanes)[:, 0][: u.shape[1]]  # case 0, lane 0, features
        np.testing.assert_allclose(first, u[0, : len(first)], atol=1e-5)
        # and the whole round trip of a 3-member ensemble against the plaintext function of the same inputs
        _, model = he.random_model(seed=4, members=3)
        worker = HeWorker.for_home(model, settings.home)
        z = np.abs(np.random.default_rng(4).normal(size=(3, 1, model.z_dim)))
        result = worker.evaluate(pack, z)
        out = client.finalize(result, t_edss=0.01)  # the key service applies its checkpoint's T, not 0.01
        from msgate.model.patient.calibration import softmax

        want = softmax(model.plain_logits(u, z)[:, :4])
        assert np.abs(np.asarray(out[0]["edss_probabilities"]) - want[0]).max() <= 1e-3
        # no decryption oracle: one decryption per request, one encryption per job attempt, running jobs only
        with pytest.raises(Rejected, match="already decrypted"):
            client.finalize(result)
        with pytest.raises(Rejected, match="already had its HE inputs"):
            client.encrypt_jobs([job_id], model=spec.fingerprint)
        with store.db.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.attempts = 2  # claimed again after a failed attempt
        assert client.encrypt_jobs([job_id], model=spec.fingerprint)
        with store.db.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.state = "done"
        with pytest.raises(Rejected, match="not running"):
            client.encrypt_jobs([job_id], model=spec.fingerprint)
        with pytest.raises(Rejected, match="no job"):
            client.encrypt_jobs(["no-such-job"], model=spec.fingerprint)
        with pytest.raises(Rejected, match="differs"):
            client.encrypt_jobs([job_id], model="another-checkpoint")
    finally:
        stop.set()
        store.close()
