"""``msgate trace`` by outbox entry: the id (or a prefix) that ``outbox list`` shows, and the MSH-10 of an ORU
the outbox sent (``MG`` + the entry id's first 14 characters + a copy number, results/control_ids.py), both
lead to the entry, its job and its study. Both said "nothing found" and exited 1. The CLI runs through
typer's CliRunner on the real app (embedded store and PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, select
from typer.testing import CliRunner, Result

from msgate.cli.app import app
from msgate.config import Settings
from msgate.results import outbox
from msgate.results.control_ids import control_id
from msgate.storage import keyring
from msgate.storage.models import AuditEvent, OutboxEntry
from msgate.storage.store import Store
from msgate.workers import jobs
from tests.conftest import make_settings
from tests.dicom_factory import mr_slice

pytestmark = pytest.mark.integration
ENGINE_PORT = 47530  # this suite's range (47500-47599); nothing listens: the ORU is only queued and claimed


@pytest.fixture
def settings(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Settings:
    """conftest's storage matrix, with an interface engine configured so the job's ORU is queued."""
    pg = request.getfixturevalue("pg_url") if backend == "postgres" else None
    home = tmp_path / "home"
    if backend == "postgres":
        keyring.init(home / "keys" / "keyring.json")
    return make_settings(home, backend, pg, hl7_out={"port": ENGINE_PORT})


def feed(store: Store) -> tuple[int, str, OutboxEntry]:
    """A study, its job and the job's ORU, sent once and answered AA. Returns (study id, job id, entry)."""
    study_id = store.ingest.store_instance(source=mr_slice(accession="ACC-OUT")).study_id
    job = jobs.create(store.db, study_id=study_id, idem_key="trace-outbox", model_version="test-1", flags={})
    assert job is not None
    with store.db.session() as session:
        [entry] = outbox.enqueue(store, session, job_id=job.id,
                                 objects=[outbox.Rendered("out.oru", b"MSH|^~\\&|MSGATE\r")])
        session.expunge(entry)
    policy = outbox.Policy()
    [claimed] = outbox.claim(store, policy)
    assert outbox.record(store, claimed, outbox.Attempt("delivered", "AA"), policy) == "delivered"
    return study_id, job.id, entry


def cli(settings: Settings, *args: str) -> Result:
    env = {"MSGATE_HOME": str(settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
           "MSGATE_STORAGE__PURGE_FREE_BYTES": "0"}
    if settings.database_url:
        env |= {"MSGATE_DATABASE_URL": settings.database_url, "MSGATE_STORAGE__BLOB_BACKEND": "postgres"}
    return CliRunner().invoke(app, list(args), env=env)


def trace(settings: Settings, ident: str) -> dict[str, Any]:
    out = cli(settings, "trace", ident, "--json")
    assert out.exit_code == 0, out.output
    return dict(json.loads(out.stdout))


def reaches(data: dict[str, Any], study_id: int, job_id: str, entry_id: str) -> None:
    assert data["studies"] == [study_id] and data["outbox"] == [entry_id], data
    seen = {(e["stage"], e["event"], e["ref"]) for e in data["events"]}
    assert ("job", "job created (model test-1)", f"job:{job_id[:8]}") in seen
    assert ("result", "hl7 to hl7 queued", f"outbox:{entry_id[:8]}") in seen
    assert ("result", "hl7 delivered", f"outbox:{entry_id[:8]}") in seen
    assert any(e["event"].startswith("study first instance") for e in data["events"])


def test_the_id_that_outbox_list_shows_reaches_the_job_and_study(store: Store, settings: Settings) -> None:
    study_id, job_id, entry = feed(store)
    listed = json.loads(cli(settings, "outbox", "list", "--json").stdout)
    assert [d["id"] for d in listed] == [entry.id]
    for ident in (entry.id, entry.id[:12], entry.id[:8], entry.id[:12].upper()):
        reaches(trace(settings, ident), study_id, job_id, entry.id)
    with store.db.session() as session:
        traces = session.exec(select(AuditEvent).where(AuditEvent.kind == "operator.trace")
                              .order_by(col(AuditEvent.seq))).all()
    assert {(t.subject, json.dumps(t.detail)) for t in traces} == {
        (f"study:{study_id}", json.dumps({"outbox": [entry.id]}))}


def test_an_outbound_control_id_reaches_its_entry(store: Store, settings: Settings) -> None:
    study_id, job_id, entry = feed(store)
    for copy in (1, 2, 17):  # a copy sent after an engine's negative answer has the next number
        reaches(trace(settings, control_id(entry.id, copy)), study_id, job_id, entry.id)
    out = cli(settings, "trace", control_id("f" * 32, 1))  # the shape of one, but no such entry
    assert out.exit_code == 1 and "nothing found" in out.output


def test_an_ambiguous_entry_prefix_lists_the_candidates_and_exits_2(store: Store, settings: Settings) -> None:
    study_id, job_id, entry = feed(store)
    with store.db.session() as session:
        for n in (1, 2):
            session.add(OutboxEntry(id=f"feedfacecafe{n}" + "0" * 19, job_id=job_id, kind="hl7", destination="hl7",
                                    blob_id=entry.blob_id, state="dead"))
    out = cli(settings, "trace", "feedfacecafe")
    assert out.exit_code == 2, out.output
    assert "feedfacecafe1" in out.output and "feedfacecafe2" in out.output and "several" in out.output
    as_json = cli(settings, "trace", "feedfacecafe", "--json")
    assert as_json.exit_code == 2
    assert sorted(c["id"] for c in json.loads(as_json.stdout)) == [f"feedfacecafe{n}" + "0" * 19 for n in (1, 2)]
    assert trace(settings, "feedfacecafe2")["outbox"] == ["feedfacecafe2" + "0" * 19]  # one more character


def test_an_entry_without_a_job_is_traced_on_its_own(store: Store, settings: Settings) -> None:
    _, _, entry = feed(store)
    with store.db.session() as session:
        session.add(OutboxEntry(id="0dd" + "1" * 29, job_id=None, kind="hl7", destination="hl7",
                                blob_id=entry.blob_id, state="pending"))
    data = trace(settings, "0dd111")
    assert data["studies"] == [] and data["outbox"] == ["0dd" + "1" * 29]
    assert [e["event"] for e in data["events"]] == ["hl7 to hl7 queued"]


def test_a_job_id_that_also_prefixes_several_entries_traces_the_job(store: Store, settings: Settings) -> None:
    """A job id (or its prefix) that other entries' ids happen to start with names the job: trace shows it
    instead of listing those entries and exiting 2. The entries are only listed when nothing else matched."""
    study_id, job_id, entry = feed(store)
    prefix = job_id[:12]
    with store.db.session() as session:
        for n in (1, 2):
            session.add(OutboxEntry(id=f"{prefix}{n}" + "0" * 19, job_id=None, kind="hl7", destination="hl7",
                                    blob_id=entry.blob_id, state="dead"))
    for ident in (job_id, prefix):
        data = trace(settings, ident)
        assert data["studies"] == [study_id] and data["outbox"] == [], data
        seen = {(e["stage"], e["event"], e["ref"]) for e in data["events"]}
        assert ("job", "job created (model test-1)", f"job:{job_id[:8]}") in seen
        assert ("result", "hl7 delivered", f"outbox:{entry.id[:8]}") in seen  # the job's own entry
    text = cli(settings, "trace", prefix)
    assert text.exit_code == 0, text.output
    assert "also starts 2 outbox entries" in " ".join(text.output.split())
