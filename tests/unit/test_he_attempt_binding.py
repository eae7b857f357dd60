"""HE: each ``encrypt_jobs`` request is bound to the job attempt it was made for.

Review 2 #8: while the keys role was away, a worker's request R1 (attempt 1) waited in ``msgate.he-keys``;
the worker timed out and Celery retried the job, whose attempt 2 sent R2. When the keys role came back, it
served R1 first: R1 used up attempt 2's single encryption, and R2, the request the worker waited on, was
refused ``he_replay`` and the job failed for good. Now R1 names attempt 1, is refused ``he_stale`` and
leaves no state (no audit event, no use of the attempt); R2 is encrypted; a second request for attempt 2
is still refused ``he_replay``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

import test_workers_double as double  # noqa: E402
from conftest import make_settings  # noqa: E402
from sqlmodel import select  # noqa: E402

from msgate.errors import Transient  # noqa: E402
from msgate.model import he  # noqa: E402
from msgate.model.he_keys import HeKeys  # noqa: E402
from msgate.model.he_rpc import handle  # noqa: E402
from msgate.model.he_service import AUDIT_KIND, JobSource, ModelSpec  # noqa: E402
from msgate.model.patient.ehr import N_COLUMNS  # noqa: E402
from msgate.model.types import Case, ModelResult  # noqa: E402
from msgate.storage.models import AuditEvent  # noqa: E402
from msgate.storage.store import Store, open_store  # noqa: E402
from msgate.workers import inference, jobs, runtime  # noqa: E402
from msgate.workers.celery_app import build_app  # noqa: E402
from msgate.workers.scheduler import Scheduler  # noqa: E402

pytestmark = pytest.mark.slow  # CKKS key generation

MODEL_VERSION = "attempt-binding-1"
READS_EHR = False
SEEN: list[dict[str, int]] = []  # the attempts bound while predict ran (this module is also the model)


def load_model() -> None:
    return None


def warm_up() -> None:
    return None


def predict(cases: list[Case]) -> list[ModelResult]:
    from msgate.model.he_rpc import bound_attempts

    SEEN.append(bound_attempts())
    raise Transient("the HE key service did not answer within 60 s", code="he_timeout")


@dataclass
class Rig:
    store: Store
    keys: HeKeys
    source: JobSource
    job_id: str

    def request(self, attempt: int | None) -> dict[str, Any]:
        req: dict[str, Any] = {"op": "encrypt_jobs", "job_ids": [self.job_id],
                               "model": self.source.spec().fingerprint}
        if attempt is not None:
            req["attempts"] = {self.job_id: attempt}
        return handle(self.keys, req, self.source)

    def he_reads(self) -> int:
        with self.store.db.session() as session:
            rows = session.exec(select(AuditEvent).where(AuditEvent.kind == AUDIT_KIND,
                                                         AuditEvent.subject == f"job:{self.job_id}")).all()
        return len(rows)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    settings = make_settings(tmp_path / "home", "sqlite", he={"enabled": True},
                             workers={"model_module": "test_workers_double", "ehr_deadline_seconds": 0,
                                      "required_ehr_fields": []})
    store = open_store(settings)
    try:
        double.make_study(store, seed=81)
        double.add_patient(store, mrn="MRN00081", nfl=9.0, sex="F")
        [job_id] = Scheduler(store, build_app(settings)).scan()
        keys = HeKeys(settings.home, store.ring)
        keys.generate(he.HeParams())
        spec = ModelSpec((0.0,) * N_COLUMNS, (1.0,) * N_COLUMNS, (32, 32, 32))
        yield Rig(store, keys, JobSource(store, _spec=spec, actor="keys-test"), job_id)
    finally:
        store.close()


def _second_attempt(rig: Rig) -> None:
    """Attempt 1 claims the job and times out waiting for the key service; the retry claims attempt 2."""
    db = rig.store.db
    assert jobs.claim(db, rig.job_id, owner="w", lease_seconds=900, via="message") is not None
    assert jobs.release(db, rig.job_id, owner="w", error="transient: he_timeout (he_timeout)", max_attempts=6)
    claim = jobs.claim(db, rig.job_id, owner="w", lease_seconds=900, via="message")
    assert claim is not None and claim.attempts == 2


def test_a_request_of_an_earlier_attempt_is_stale_and_uses_nothing(rig: Rig) -> None:
    _second_attempt(rig)
    stale = rig.request(1)  # R1: waited in the queue while the keys role was away; nobody waits for it now
    assert stale.get("code") == "he_stale", stale
    assert "packs" not in stale and not stale.get("transient")
    assert rig.he_reads() == 0 and rig.source.issued == {}  # no audit event, the attempt is not used
    current = rig.request(2)  # R2: the request the worker of attempt 2 waits on
    assert "error" not in current, current
    assert len(current["packs"]) == 1 and rig.he_reads() == 1
    again = rig.request(2)  # one encryption per attempt stays
    assert again.get("code") == "he_replay" and rig.he_reads() == 1


def test_a_request_for_a_later_attempt_is_stale_too(rig: Rig) -> None:
    assert jobs.claim(rig.store.db, rig.job_id, owner="w", lease_seconds=900, via="message") is not None
    assert rig.request(2).get("code") == "he_stale" and rig.source.issued == {}
    assert "packs" in rig.request(1)


def test_an_unbound_request_keeps_the_one_encryption_per_attempt_rule(rig: Rig) -> None:
    """A worker older than the binding sends no attempt: its request counts for the current attempt."""
    assert jobs.claim(rig.store.db, rig.job_id, owner="w", lease_seconds=900, via="message") is not None
    assert "packs" in rig.request(None)
    assert rig.request(None).get("code") == "he_replay"
    assert rig.request(1).get("code") == "he_replay"
    assert rig.he_reads() == 1


def test_the_worker_binds_its_claims_attempts_while_it_predicts(tmp_path: Path) -> None:
    workers = {"model_module": "test_he_attempt_binding", "ehr_deadline_seconds": 0,
               "required_ehr_fields": [], "batch_wait_seconds": 0}
    store = open_store(make_settings(tmp_path / "home", "sqlite", workers=workers, he={"enabled": True}))
    try:
        double.make_study(store, seed=82)
        [job_id] = Scheduler(store, build_app(store.settings)).scan()
        rt = runtime.Runtime(store.settings, store)
        SEEN.clear()
        for attempt in (1, 2):
            with pytest.raises(Transient):
                inference.run(rt, job_id, task_id=f"t-{attempt}", handoff=lambda _: None)
            job = jobs.state_of(store.db, job_id)
            assert job is not None and job.state == "queued"
        assert SEEN == [{job_id: 1}, {job_id: 2}]
        from msgate.model.he_rpc import bound_attempts

        assert bound_attempts() == {}  # unbound again outside the worker's predict
    finally:
        store.close()


def test_a_keys_host_clock_ahead_of_the_worker_does_not_drop_its_requests() -> None:
    """The deadline is the worker's wall clock: a keys host a minute ahead used to drop every request."""
    from msgate.config import HeSettings
    from msgate.model.he_rpc import expired_by

    allowance = HeSettings().clock_skew_seconds
    req = {"op": "encrypt_jobs", "expires_at": 1000.0}
    assert expired_by(req, now=1060.0, skew=allowance) is None  # 60 s of skew: served
    assert expired_by(req, now=1000.0 + allowance + 40.0, skew=allowance) == 40.0
    assert expired_by(req, now=1060.0) == 60.0  # no allowance: the old behaviour
