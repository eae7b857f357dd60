"""Retention without an operator, on the embedded SQLite store and the machine's PostgreSQL.

The scheduler role purges an eligible delivered study by itself every ``storage.purge_interval_s``
(``msgate db purge`` used to be the only way); a purge erases the engine's encrypted free text
(``outbox_attempt.peer_text_enc``, which may name the patient) of that study's outbox attempts, while
another study's stays, and ``outbox show`` says it was erased by retention. Two purges never run at once:
a scheduled purge skips while another (a second scheduler, ``db purge``) holds the guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlmodel import select

from msgate.results.outbox import PEER_TEXT_COLUMN
from msgate.storage import audit, keyring, retention
from msgate.storage.models import Blob, Instance, Job, OutboxAttempt, OutboxEntry, Study, utcnow
from msgate.storage.store import Store, open_store
from tests.conftest import make_settings
from tests.dicom_factory import mr_slice

pytestmark = [pytest.mark.integration]

TEXT = "MSA-3: Patient DOE^JOHN not found"
NO_MODEL = {"model_module": "msgate_test_no_such_model"}  # the scheduler plans nothing: only retention acts


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    home = tmp_path / "home"
    pg = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    if pg is not None:
        keyring.init(home / "keys" / "keyring.json")
    st = open_store(make_settings(home, request.param, pg, workers=NO_MODEL, storage={"purge_interval_s": 0.5}))
    yield st
    st.close()


def _delivered_study(store: Store, *, days_ago: float) -> tuple[int, str, int]:
    """One stored instance, its study delivered ``days_ago``, and one delivered ORU whose attempt holds
    the engine's encrypted text; returns (study id, outbox entry id, attempt id)."""
    stored = store.ingest.store_instance(source=mr_slice(study_uid=generate_uid()))
    when = utcnow() - timedelta(days=days_ago)
    with store.db.session() as s:
        study = s.get(Study, stored.study_id)
        assert study is not None
        study.delivered_at, study.state = when, "ready"
        s.add(study)
        for inst in s.exec(select(Instance).where(Instance.study_id == study.id)).all():
            inst.received_at = when - timedelta(days=1)
            s.add(inst)
        job = Job(study_id=stored.study_id, idem_key=generate_uid(), state="done", created_at=when - timedelta(hours=1))
        s.add(job)
        s.flush()
        oru = store.blobs.put(s, kind="out.oru", source=b"MSH|^~\\&|MSGATE|HOSP|ENGINE|HOSP|||ORU^R01|1|P|2.5.1\r")
        s.flush()
        entry = OutboxEntry(job_id=job.id, kind="hl7", destination="hl7", blob_id=oru.id, state="delivered",
                            attempts=2, delivered_at=when)
        s.add(entry)
        s.flush()
        s.add(OutboxAttempt(entry_id=entry.id, outcome="retry", peer_status="nak", detail="AE",
                            peer_text_enc=store.cipher.encrypt(TEXT, column=PEER_TEXT_COLUMN)))
        delivered = OutboxAttempt(entry_id=entry.id, outcome="delivered", peer_status="AA", detail="AA")
        s.add(delivered)
        s.flush()
        first = s.exec(select(OutboxAttempt.id).where(OutboxAttempt.entry_id == entry.id,
                                                      OutboxAttempt.outcome == "retry")).one()
        return stored.study_id, entry.id, int(first)  # type: ignore[arg-type]


def _texts(store: Store, entry_id: str) -> list[str | None]:
    with store.db.session() as s:
        rows = s.exec(select(OutboxAttempt).where(OutboxAttempt.entry_id == entry_id)
                      .order_by(OutboxAttempt.id)).all()  # type: ignore[arg-type]
        return [store.cipher.decrypt(a.peer_text_enc, column=PEER_TEXT_COLUMN) for a in rows]


def _purged_at(store: Store, study_id: int) -> object:
    with store.db.session() as s:
        study = s.get(Study, study_id)
        assert study is not None
        return study.purged_at


def _cli(store: Store, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    env.update({"MSGATE_HOME": str(store.settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0", "COLUMNS": "250"})
    if store.settings.resolved_database_url.startswith("postgresql"):
        env.update({"MSGATE_DATABASE_URL": store.settings.resolved_database_url,
                    "MSGATE_STORAGE__BLOB_BACKEND": "postgres"})
    return subprocess.run([sys.executable, "-m", "msgate", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_the_scheduler_role_purges_a_delivered_study_and_its_engine_text_by_itself(store: Store) -> None:
    old, old_entry, old_attempt = _delivered_study(store, days_ago=store.settings.storage.retention_days + 1)
    recent, recent_entry, _ = _delivered_study(store, days_ago=1)  # inside retention_days: kept
    from msgate.workers import scheduler

    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(store, stop), daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 30
        while _purged_at(store, old) is None and time.monotonic() < end:
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not thread.is_alive()
    assert _purged_at(store, old) is not None, "the scheduler role never applied retention"
    assert _purged_at(store, recent) is None
    assert _texts(store, old_entry) == [None, None]
    assert _texts(store, recent_entry) == [TEXT, None]
    with store.db.session() as s:
        blob_ids = s.exec(select(Instance.blob_id).where(Instance.study_id == old)).all()
        assert all(s.get(Blob, b).purged_at is not None for b in blob_ids)  # type: ignore[union-attr]
        [event] = [e for e in audit.tail(s, 50) if e.kind == "retention.purge"]
        assert event.subject == f"study:{old}" and event.detail["engine_texts"] == 1
        assert event.detail["attempt_ids"] == [old_attempt]
        assert audit.verify(s).ok

    shown = _cli(store, "outbox", "show", old_entry)
    assert shown.returncode == 0, shown.stderr
    assert "engine text erased by retention" in shown.stdout and "DOE" not in shown.stdout
    doc = json.loads(_cli(store, "outbox", "show", old_entry, "--json").stdout)
    assert [h["peer_text_erased"] for h in doc["history"]] == [True, False]
    assert [h["peer_text"] for h in doc["history"]] == [None, None]
    with store.db.session() as s:  # nothing was decrypted: no phi.view for that entry
        assert not [e for e in audit.tail(s, 50) if e.kind == "phi.view" and e.subject == f"outbox:{old_entry}"]
    kept = json.loads(_cli(store, "outbox", "show", recent_entry, "--json").stdout)
    assert [h["peer_text"] for h in kept["history"]] == [TEXT, None]
    assert [h["peer_text_erased"] for h in kept["history"]] == [False, False]


def test_a_manual_purge_erases_engine_text_and_a_dry_run_changes_nothing(store: Store) -> None:
    old, old_entry, _ = _delivered_study(store, days_ago=store.settings.storage.retention_days + 1)
    _, recent_entry, _ = _delivered_study(store, days_ago=1)
    dry = retention.purge(store, dry_run=True)
    assert (dry.studies, dry.engine_texts) == ([old], 1)
    assert _texts(store, old_entry) == [TEXT, None] and _purged_at(store, old) is None
    done = _cli(store, "db", "purge")
    assert done.returncode == 0, done.stderr
    assert "1 engine texts erased" in done.stdout
    assert _texts(store, old_entry) == [None, None]
    assert _texts(store, recent_entry) == [TEXT, None]


def test_texts_kept_by_a_purge_made_before_retention_erased_them_are_erased(store: Store) -> None:
    """A study purged by an earlier msgate kept its engine texts: the next purge erases them too."""
    old, old_entry, old_attempt = _delivered_study(store, days_ago=store.settings.storage.retention_days + 1)
    with store.db.session() as s:  # as the earlier msgate left it: purged, the text still there
        study = s.get(Study, old)
        assert study is not None
        study.purged_at = utcnow()
        s.add(study)
    assert retention.purge(store, dry_run=True).engine_texts == 1
    assert _texts(store, old_entry) == [TEXT, None]
    report = retention.purge(store)
    assert (report.studies, report.engine_texts) == ([], 1)
    assert _texts(store, old_entry) == [None, None]
    with store.db.session() as s:
        event = audit.tail(s, 1)[0]
        assert (event.kind, event.subject, event.detail["attempt_ids"]) == ("retention.erase", f"study:{old}",
                                                                            [old_attempt])
    doc = json.loads(_cli(store, "outbox", "show", old_entry, "--json").stdout)
    assert [h["peer_text_erased"] for h in doc["history"]] == [True, False]
    assert retention.purge(store).engine_texts == 0


def test_a_scheduled_purge_skips_while_another_purge_holds_the_guard(store: Store) -> None:
    old, _, _ = _delivered_study(store, days_ago=store.settings.storage.retention_days + 1)
    with retention.exclusive(store.db, wait=True) as held:  # another process's purge (a second scheduler)
        assert held
        skipped = retention.purge(store, wait=False)
        assert skipped.skipped and skipped.studies == [] and _purged_at(store, old) is None
    report = retention.purge(store, wait=False)
    assert not report.skipped and report.studies == [old]


def test_a_manual_purge_waits_for_the_running_one(store: Store) -> None:
    old, _, _ = _delivered_study(store, days_ago=store.settings.storage.retention_days + 1)
    held, release = threading.Event(), threading.Event()

    def other() -> None:
        with retention.exclusive(store.db, wait=True):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    assert held.wait(10)
    threading.Timer(1.0, release.set).start()
    started = time.monotonic()
    report = retention.purge(store)  # `db purge`: waits, then purges
    thread.join(10)
    assert time.monotonic() - started >= 0.9
    assert report.studies == [old] and not report.skipped
