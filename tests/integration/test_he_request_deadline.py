"""HE over the real embedded broker: a request carries its deadline (sent time + the client's timeout)
and the job attempt it was made for.

Review 2 #8: a request that waited in ``msgate.he-keys`` past its deadline (the keys role was away)
was served when the keys role came back, and used up the job's single encryption for its attempt. Now
the key service drops it unserved: no audit event, no EHR read, no use of the attempt, no reply, and a
PHI-free log line. A request bound to an earlier attempt is refused ``he_stale`` over the broker.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import test_workers_double as double
from conftest import make_settings
from sqlmodel import select

from msgate.config import Settings
from msgate.errors import Rejected, Transient
from msgate.model import he
from msgate.model.he_keys import HeKeys
from msgate.model.he_rpc import REQUEST_QUEUE, BrokerKeyClient, broker_connection, serve
from msgate.model.he_service import AUDIT_KIND, JobSource, ModelSpec
from msgate.model.patient.ehr import N_COLUMNS
from msgate.storage.models import AuditEvent
from msgate.storage.store import open_store
from msgate.workers import jobs
from msgate.workers.celery_app import build_app
from msgate.workers.scheduler import Scheduler

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _depth(settings: object, queue: str) -> int:
    with broker_connection(settings) as conn, conn.SimpleQueue(queue) as q:
        return int(q.qsize())


def _handled(caplog: pytest.LogCaptureFixture) -> bool:
    return any(r.getMessage().startswith(("HE request served", "HE request expired")) for r in caplog.records)


def _settings(tmp_path: Path) -> Settings:
    """HE on, no clock-skew allowance (a request is late once past its deadline), cases planned at once."""
    return make_settings(tmp_path / "home", "sqlite", he={"enabled": True, "clock_skew_seconds": 0},
                         workers={"model_module": "test_workers_double", "ehr_deadline_seconds": 0,
                                  "required_ehr_fields": []})


def test_an_expired_request_is_dropped_unserved(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = _settings(tmp_path)
    store = open_store(settings)
    stop, ready = threading.Event(), threading.Event()
    thread: threading.Thread | None = None
    try:
        double.make_study(store, seed=83)
        double.add_patient(store, mrn="MRN00083", nfl=14.0, sex="M")
        [job_id] = Scheduler(store, build_app(settings)).scan()
        claim = jobs.claim(store.db, job_id, owner="w", lease_seconds=900, via="message")
        assert claim is not None and claim.attempts == 1
        keys = HeKeys(settings.home, store.ring)
        keys.generate(he.HeParams())
        spec = ModelSpec((0.0,) * N_COLUMNS, (1.0,) * N_COLUMNS, (32, 32, 32))
        source = JobSource(store, _spec=spec, actor="keys-test")
        client = BrokerKeyClient(settings, timeout=1)
        # the keys role is away: the request waits in its queue and the worker times out
        with pytest.raises(Transient, match="did not answer"):
            client.encrypt_jobs([job_id], model=spec.fingerprint)
        assert _depth(settings, REQUEST_QUEUE) == 1
        time.sleep(0.2)
        caplog.set_level(logging.INFO, logger="msgate.model.he_rpc")
        thread = threading.Thread(target=serve, args=(keys, settings, stop),
                                  kwargs={"ready": ready, "jobs": source, "pause": (0.1, 0.5)}, daemon=True)
        thread.start()
        assert ready.wait(30)
        end = time.monotonic() + 30
        while not _handled(caplog) and time.monotonic() < end:  # served (before) or dropped (now)
            time.sleep(0.1)
        assert _handled(caplog) and _depth(settings, REQUEST_QUEUE) == 0
        with store.db.session() as session:
            reads = session.exec(select(AuditEvent).where(AuditEvent.kind == AUDIT_KIND)).all()
        assert reads == [] and source.issued == {}  # not served: no EHR read, the attempt is not used
        assert _depth(settings, client.reply_to) == 0  # and no reply for nobody
        dropped = [r for r in caplog.records if "expired" in r.getMessage()]
        assert len(dropped) == 1 and getattr(dropped[0], "code", None) == "he_expired"
        assert "MRN" not in dropped[0].getMessage()
        # the worker's next request, in time, is served: the attempt's one encryption is still there
        live = BrokerKeyClient(settings, timeout=30)
        (pack,) = live.encrypt_jobs([job_id], model=spec.fingerprint)
        assert pack.case_ids == (job_id,) and source.issued == {job_id: 1}
    finally:
        stop.set()
        if thread is not None:
            thread.join(10)
        store.close()


def test_a_request_of_an_earlier_attempt_is_refused_over_the_broker(tmp_path: Path) -> None:
    from msgate.model.he_rpc import for_attempts

    settings = _settings(tmp_path)
    store = open_store(settings)
    stop, ready = threading.Event(), threading.Event()
    thread: threading.Thread | None = None
    try:
        double.make_study(store, seed=84)
        double.add_patient(store, mrn="MRN00084", nfl=11.0, sex="F")
        [job_id] = Scheduler(store, build_app(settings)).scan()
        assert jobs.claim(store.db, job_id, owner="w", lease_seconds=900, via="message") is not None
        assert jobs.release(store.db, job_id, owner="w", error="transient: he_timeout", max_attempts=6)
        assert jobs.claim(store.db, job_id, owner="w", lease_seconds=900, via="message") is not None
        keys = HeKeys(settings.home, store.ring)
        keys.generate(he.HeParams())
        spec = ModelSpec((0.0,) * N_COLUMNS, (1.0,) * N_COLUMNS, (32, 32, 32))
        source = JobSource(store, _spec=spec, actor="keys-test")
        thread = threading.Thread(target=serve, args=(keys, settings, stop),
                                  kwargs={"ready": ready, "jobs": source}, daemon=True)
        thread.start()
        assert ready.wait(30)
        client = BrokerKeyClient(settings, timeout=30)
        with for_attempts({job_id: 1}), pytest.raises(Rejected) as info:
            client.encrypt_jobs([job_id], model=spec.fingerprint)
        assert info.value.code == "he_stale" and source.issued == {}
        with for_attempts({job_id: 2}):
            (pack,) = client.encrypt_jobs([job_id], model=spec.fingerprint)
        assert pack.case_ids == (job_id,) and source.issued == {job_id: 2}
        with for_attempts({job_id: 2}), pytest.raises(Rejected) as info:
            client.encrypt_jobs([job_id], model=spec.fingerprint)
        assert info.value.code == "he_replay"
    finally:
        stop.set()
        if thread is not None:
            thread.join(10)
        store.close()
