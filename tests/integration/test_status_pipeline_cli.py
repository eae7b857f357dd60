"""``msgate status --json`` through the real CLI on a real store: every role's heartbeat live and both
listener ports answering, yet jobs failing, a ready study that never got a job (the scheduler cannot load
its model), or, in homomorphic mode, no key service. Each printed OK and exited 0."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select
from typer.testing import CliRunner

from msgate.cli.app import app
from msgate.config import Settings
from msgate.storage import heartbeat, keyring
from msgate.storage.models import Job, Series, Study, utcnow
from msgate.storage.store import Store
from tests.conftest import make_settings
from tests.dicom_factory import mr_slice

pytestmark = pytest.mark.integration
DICOM_PORT, HL7_PORT = 47520, 47521  # this suite's range (47500-47599)
PIPELINE = ["dicom", "hl7", "scheduler", "worker", "publish"]


@pytest.fixture
def settings(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Settings:
    pg = request.getfixturevalue("pg_url") if backend == "postgres" else None
    home = tmp_path / "home"
    if backend == "postgres":
        keyring.init(home / "keys" / "keyring.json")
    return make_settings(home, backend, pg, dicom={"port": DICOM_PORT}, hl7={"port": HL7_PORT})


@pytest.fixture
def listeners() -> Iterator[None]:
    """Both listener ports answer (the listeners themselves are not what these tests are about)."""
    socks = []
    for port in (DICOM_PORT, HL7_PORT):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        socks.append(sock)
    yield
    for sock in socks:
        sock.close()


def status(store: Store, *args: str, roles: list[str] = PIPELINE, env: dict[str, str] | None = None
           ) -> tuple[int, dict[str, Any]]:
    settings = store.settings
    environ = {"MSGATE_HOME": str(settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
               "MSGATE_STORAGE__PURGE_FREE_BYTES": "0", "MSGATE_DICOM__PORT": str(DICOM_PORT),
               "MSGATE_HL7__PORT": str(HL7_PORT), **(env or {})}
    if settings.database_url:
        environ |= {"MSGATE_DATABASE_URL": settings.database_url, "MSGATE_STORAGE__BLOB_BACKEND": "postgres"}
    heartbeat.beat(store.db, roles, utcnow())  # fresh: every role running
    out = CliRunner().invoke(app, ["status", "--json", *args], env=environ)
    return out.exit_code, dict(json.loads(out.stdout))


def study(store: Store, *, ready_ago: timedelta) -> int:
    """A study with a FLAIR series, declared ready ``ready_ago`` ago."""
    study_id = store.ingest.store_instance(source=mr_slice()).study_id
    with store.db.session() as session:
        row = session.get(Study, study_id)
        assert row is not None
        row.state, row.ready_at = "ready", utcnow() - ready_ago
        session.add(row)
        for series in session.exec(select(Series).where(Series.study_id == study_id)).all():
            series.role = "FLAIR"
            session.add(series)
    return study_id


def jobs(store: Store, study_id: int, states: list[str]) -> None:
    now = utcnow()
    with store.db.session() as session:
        for state in states:
            session.add(Job(study_id=study_id, idem_key=uuid.uuid4().hex, state=state, model_version="test",
                            error="model error" if state == "failed" else None,
                            created_at=now - timedelta(minutes=10), finished_at=now - timedelta(minutes=5)))


def test_a_working_pipeline_is_ok(store: Store, listeners: None) -> None:
    jobs(store, study(store, ready_ago=timedelta(minutes=20)), ["done"] * 5 + ["failed"])
    study(store, ready_ago=timedelta(seconds=30))  # just ready: may wait for its EHR
    code, report = status(store)
    assert code == 0 and report["health"] == "ok", report
    assert report["jobs"]["health"] == "ok" and report["studies"] == {**report["studies"], "health": "ok",
                                                                      "stuck": 0}


def test_failing_jobs_degrade_status(store: Store, listeners: None) -> None:
    jobs(store, study(store, ready_ago=timedelta(minutes=20)), ["failed"] * 5 + ["done"])
    code, report = status(store)
    assert code == 1 and report["health"] == "degraded", report
    assert report["jobs"]["health"] == "degraded" and "5 of 6" in report["jobs"]["reason"]
    assert all(role["health"] == "ok" for role in report["roles"].values())
    code, report = status(store, "--job-failures", "6")  # the threshold is the operator's
    assert code == 0 and report["jobs"]["health"] == "ok", report


def test_a_ready_study_that_never_got_a_job_degrades_status(store: Store, listeners: None) -> None:
    """The scheduler is alive but cannot load the model: it creates no jobs and the study waits forever."""
    study(store, ready_ago=timedelta(hours=1))
    code, report = status(store)
    assert code == 1 and report["health"] == "degraded", report
    assert report["studies"]["health"] == "degraded" and report["studies"]["stuck"] == 1
    assert report["jobs"]["health"] == "ok"  # no job failed: there are none


def test_homomorphic_mode_requires_the_keys_role(store: Store, listeners: None) -> None:
    code, report = status(store, env={"MSGATE_HE__ENABLED": "true"})
    assert code == 1 and report["roles"]["keys"]["health"] == "down", report
    code, report = status(store, roles=[*PIPELINE, "keys"], env={"MSGATE_HE__ENABLED": "true"})
    assert code == 0 and report["roles"]["keys"]["health"] == "ok", report
    code, report = status(store)  # HE off: the keys role is not expected
    assert code == 0 and "keys" not in report["roles"], report


def test_the_terminal_view_names_the_stuck_studies(store: Store, listeners: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    study(store, ready_ago=timedelta(hours=1))
    jobs(store, study(store, ready_ago=timedelta(hours=2)), ["failed"] * 3)
    settings = store.settings
    environ = {"MSGATE_HOME": str(settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
               "MSGATE_STORAGE__PURGE_FREE_BYTES": "0", "MSGATE_DICOM__PORT": str(DICOM_PORT),
               "MSGATE_HL7__PORT": str(HL7_PORT), "COLUMNS": "80"}
    if settings.database_url:
        environ |= {"MSGATE_DATABASE_URL": settings.database_url, "MSGATE_STORAGE__BLOB_BACKEND": "postgres"}
    heartbeat.beat(store.db, PIPELINE, utcnow())
    out = CliRunner().invoke(app, ["status"], env=environ)
    assert out.exit_code == 1, out.output
    lines = out.stdout.splitlines()
    assert any(line.startswith("studies") and "degraded" in line for line in lines), out.stdout
    assert any(line.startswith("jobs") and "degraded" in line for line in lines), out.stdout

