"""The pipeline parts of ``msgate status``: jobs failing in the last hour, ready studies that never got a job
(the scheduler down or unable to load its model), and the ``keys`` role in homomorphic mode. Each said
nothing, so status printed OK and exited 0 while nothing was processed. Probes on a real embedded store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import select

from msgate.cli import status_probe
from msgate.config import load_settings
from msgate.storage.models import Job, Series, Study, utcnow
from msgate.storage.store import Store, open_store
from tests.dicom_factory import mr_slice


@pytest.fixture
def pstore(tmp_path: Path) -> Iterator[Store]:
    st = open_store(load_settings(home=tmp_path / "home", storage={"min_free_bytes": 0, "purge_free_bytes": 0},
                                  workers={"ehr_deadline_seconds": 600, "scan_seconds": 2}))
    yield st
    st.close()


def _jobs(store: Store, states: list[str], *, finished_ago: timedelta = timedelta(minutes=5),
          created_ago: timedelta = timedelta(minutes=10)) -> int:
    study_id = store.ingest.store_instance(source=mr_slice()).study_id
    now = utcnow()
    with store.db.session() as session:
        for state in states:
            session.add(Job(study_id=study_id, idem_key=uuid.uuid4().hex, state=state,
                            error="model error" if state == "failed" else None,
                            created_at=now - created_ago, finished_at=now - finished_ago))
    return study_id


def _ready(store: Store, *, ago: timedelta, role: str | None = "FLAIR") -> int:
    """A study the listener declared ready ``ago`` ago, its one series classified as ``role``."""
    study_id = store.ingest.store_instance(source=mr_slice()).study_id
    with store.db.session() as session:
        study = session.get(Study, study_id)
        assert study is not None
        study.state, study.ready_at = "ready", utcnow() - ago
        session.add(study)
        for series in session.exec(select(Series).where(Series.study_id == study_id)).all():
            series.role = role
            session.add(series)
    return study_id


# --- jobs ---------------------------------------------------------------------------------------------------


def test_jobs_failing_in_the_window_are_degraded(pstore: Store) -> None:
    _jobs(pstore, ["failed"] * 5 + ["done"])
    report = status_probe.jobs(pstore.db)
    assert report["health"] == "degraded"
    assert report["failed"] == 5 and report["finished"] == 6
    assert "5 of 6" in report["reason"]


def test_a_few_failures_among_many_successes_are_ok(pstore: Store) -> None:
    _jobs(pstore, ["failed"] * 3 + ["done"] * 7)  # 30 % failed: under the default ratio
    assert status_probe.jobs(pstore.db)["health"] == "ok"


def test_fewer_failures_than_the_threshold_are_ok(pstore: Store) -> None:
    _jobs(pstore, ["failed"] * 2)  # 100 % of two jobs: under the default count
    report = status_probe.jobs(pstore.db)
    assert report["health"] == "ok" and report["reason"] == ""


def test_the_thresholds_are_configurable(pstore: Store) -> None:
    _jobs(pstore, ["failed"] * 2 + ["done"] * 8)
    assert status_probe.jobs(pstore.db)["health"] == "ok"
    assert status_probe.jobs(pstore.db, fail_count=2, fail_ratio=0.2)["health"] == "degraded"
    assert status_probe.jobs(pstore.db, fail_count=2, fail_ratio=0.25)["health"] == "ok"


def test_failures_before_the_window_neither_count_nor_show(pstore: Store) -> None:
    """The three latest failures were shown whenever they happened (a failure of last week looked current)."""
    _jobs(pstore, ["failed"] * 4, finished_ago=timedelta(hours=3), created_ago=timedelta(hours=3))
    report = status_probe.jobs(pstore.db)
    assert report["health"] == "ok" and report["failed"] == 0
    assert report["recent_failures"] == []


def test_a_job_created_earlier_that_failed_in_the_window_counts(pstore: Store) -> None:
    """Retries: the failure is counted when it happened, not when the job was created."""
    _jobs(pstore, ["failed"] * 3, finished_ago=timedelta(minutes=1), created_ago=timedelta(hours=2))
    report = status_probe.jobs(pstore.db)
    assert report["health"] == "degraded" and len(report["recent_failures"]) == 3


# --- studies --------------------------------------------------------------------------------------------


def test_a_ready_flair_study_without_a_job_past_the_deadline_is_degraded(pstore: Store) -> None:
    _ready(pstore, ago=timedelta(hours=2))
    report = status_probe.studies(pstore.db, pstore.settings)
    assert report["health"] == "degraded" and report["stuck"] == 1
    assert report["oldest_s"] >= 7200 - 5
    assert "scheduler" in report["reason"]


def test_a_study_still_inside_the_ehr_deadline_is_ok(pstore: Store) -> None:
    _ready(pstore, ago=timedelta(seconds=300))  # may still be waiting for its EHR (deadline 600 s)
    report = status_probe.studies(pstore.db, pstore.settings)
    assert report == {**report, "health": "ok", "stuck": 0}


def test_a_study_with_a_job_or_without_flair_is_not_stuck(pstore: Store) -> None:
    with_job = _ready(pstore, ago=timedelta(hours=2))
    with pstore.db.session() as session:
        session.add(Job(study_id=with_job, idem_key="has-job", state="done", finished_at=utcnow() - timedelta(hours=1),
                        created_at=utcnow() - timedelta(hours=1)))
    _ready(pstore, ago=timedelta(hours=2), role="T1")  # no FLAIR: the scheduler plans nothing for it
    assert status_probe.studies(pstore.db, pstore.settings)["health"] == "ok"


def test_the_wait_follows_the_worker_settings(tmp_path: Path) -> None:
    st = open_store(load_settings(home=tmp_path / "home", storage={"min_free_bytes": 0, "purge_free_bytes": 0},
                                  workers={"ehr_deadline_seconds": 7200, "scan_seconds": 2}))
    try:
        _ready(st, ago=timedelta(hours=1))  # inside a 2 h deadline
        assert status_probe.studies(st.db, st.settings)["health"] == "ok"
    finally:
        st.close()


# --- roles and the summary ---------------------------------------------------------------------------------


def test_the_keys_role_is_required_in_homomorphic_mode(tmp_path: Path) -> None:
    plain = load_settings(home=tmp_path / "a")
    he = load_settings(home=tmp_path / "b", he={"enabled": True})
    roles = ["dicom", "hl7", "scheduler", "worker", "publish", "keys"]
    assert "keys" not in status_probe.required_roles(plain, roles)
    assert status_probe.required_roles(he, roles) == ("dicom", "hl7", "scheduler", "worker", "publish", "keys")
    assert "keys" not in status_probe.required_roles(he, roles[:-1])  # a build without the role

