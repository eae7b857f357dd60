"""Why the interface engine refused an ORU, over a real MLLP socket: the engine answers AR/AE (or AA with a
warning) with MSA-3 free text and an ERR segment. The outbox recorded only "peer rejected the message (AR
207)"; now the coded parts (ACK code, ERR-3, ERR-4, ERR-5, ERR-2) are in the plaintext detail, the engine's
text (which names the patient) only encrypted in ``outbox_attempt.peer_text_enc``; ``msgate outbox show``
decrypts it and audits the view (``phi.view``), ``outbox list`` only marks that it exists. On the embedded
SQLite store and the machine's PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text
from sqlmodel import select, update

from msgate.results import outbox, outbox_ops
from msgate.results.hl7_out import OrderNumbers, render_oru
from msgate.storage import keyring
from msgate.storage.db import MIGRATIONS
from msgate.storage.models import AuditEvent, Job, OutboxAttempt, OutboxEntry, Study, utcnow
from msgate.storage.store import Store, open_store
from tests.conftest import make_settings
from tests.integration.pacs_peers import flair_series, model_result
from tests.integration.test_outbox_review_mllp import Engine

pytestmark = [pytest.mark.integration]
FAST = outbox.Policy(base_delay=0.2, max_delay=1.0, lease=3.0, poll=0.1, hl7_timeout=2.0)
NAME = "DOE^JOHN"
SECRETS = (NAME.encode(), b"Patient DOE", b"not found in MPI", b"DOE JOHN")
HEADER = "MSH|^~\\&|ENGINE|HOSP|MSGATE|HOSP|20251201120000||ACK^R01|A{cid}|P|2.5.1\r"
AR = HEADER + ("MSA|AR|{cid}|Patient DOE^JOHN not found\r"
               "ERR||PID^1^3^1^1|204^Unknown key identifier^HL70357|E|NOTFOUND^No patient DOE JOHN^L|||"
               "Patient DOE^JOHN not found in MPI\r")
AE = HEADER + "MSA|AE|{cid}|Patient DOE^JOHN locked, try later\rERR||PID^1^5|207^Application internal error|E|LOCK 9\r"
AA_WARNING = HEADER + "MSA|AA|{cid}\rERR|||0^Message accepted|W|W17^Name differs: DOE^L\r"
V23_AR = ("MSH|^~\\&|ENGINE|HOSP|MSGATE|HOSP|20251201120000||ACK|A{cid}|P|2.3\rMSA|AR|{cid}|Patient DOE^JOHN unknown\r"
          "ERR|PID^1^3^204&Unknown patient DOE JOHN&HL70357\r")


@pytest.fixture
def engine() -> Iterator[Engine]:
    peer = Engine([]).start()
    yield peer
    peer.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path, engine: Engine) -> Iterator[Store]:
    home = tmp_path / "home"
    pg = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    if pg is not None:
        keyring.init(home / "keys" / "keyring.json")
    st = open_store(make_settings(home, request.param, pg, hl7_out={"host": "127.0.0.1", "port": engine.port}))
    yield st
    st.close()


def _queue(store: Store) -> str:
    src = flair_series(n=1, rows=8, cols=8)[0]
    er7 = render_oru(model_result((12, 40, 48)), source=src, numbers=OrderNumbers("P1", "F1", "A1"), sr_uid="1.2.3",
                     correction=False, settings=make_settings(Path("/nonexistent"), "sqlite", hl7_out={"port": 1}))
    with store.db.session() as session:
        study = Study(study_uid_index=f"s-{utcnow().timestamp()}")
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, idem_key=f"j-{utcnow().timestamp()}", state="done")  # type: ignore[arg-type]
        session.add(job)
        session.flush()
        return outbox.enqueue(store, session, job_id=job.id, objects=[outbox.Rendered("out.oru", er7.encode())])[0].id


def _attempts(store: Store, entry_id: str) -> list[OutboxAttempt]:
    with store.db.session() as session:
        return outbox_ops.attempts_of(session, entry_id)


def _entry(store: Store, entry_id: str) -> OutboxEntry:
    with store.db.session() as session:
        entry = session.get(OutboxEntry, entry_id)
        assert entry is not None
        return entry


def _text(store: Store, attempt: OutboxAttempt) -> str | None:
    return store.cipher.decrypt(attempt.peer_text_enc, column="outbox_attempt.peer_text")


def _make_due(store: Store) -> None:
    with store.db.session() as session:
        session.exec(update(OutboxEntry).where(OutboxEntry.state == "pending")  # type: ignore[call-overload]
                     .values(next_attempt_at=utcnow()))


def _plaintext_at_rest(store: Store) -> list[str]:
    """Where a secret is stored in the clear: every byte under the home (SQLite database, WAL, blobs,
    keys) and, on PostgreSQL, every row of every table as text."""
    found = []
    # closing a file of an SQLite database drops every POSIX lock this process holds on it (SQLite's own
    # connections' included): the pool's connections are closed first, reopened at the next session
    store.db.engine.dispose()
    for path in Path(store.settings.home).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.name}: {s!r}" for s in SECRETS if s in data]
    url = store.settings.resolved_database_url
    if url.startswith("postgresql"):
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
            for table in tables:
                for (row,) in conn.execute(f'SELECT t::text FROM "{table}" t'):  # bytea shows as hex: also checked
                    found += [f"{table}: {s!r}" for s in SECRETS if s.decode() in row or s.hex() in row]
    return found


def _cli(store: Store, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``msgate`` process on this store (wide, so no line of the view is wrapped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    env.update({"MSGATE_HOME": str(store.settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0", "COLUMNS": "250"})
    if store.settings.resolved_database_url.startswith("postgresql"):
        env.update({"MSGATE_DATABASE_URL": store.settings.resolved_database_url,
                    "MSGATE_STORAGE__BLOB_BACKEND": "postgres"})
    return subprocess.run([sys.executable, "-m", "msgate", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _views(store: Store, entry_id: str) -> list[AuditEvent]:
    with store.db.session() as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.kind == "phi.view",
                                                          AuditEvent.subject == f"outbox:{entry_id}")).all())


def test_an_engine_rejection_keeps_its_codes_in_the_clear_and_its_text_only_encrypted(store: Store,
                                                                                      engine: Engine) -> None:
    engine.script[:] = [AR]
    entry_id = _queue(store)
    assert outbox.run_once(store, FAST) == 1
    entry = _entry(store, entry_id)
    (attempt,) = _attempts(store, entry_id)
    assert (entry.state, attempt.outcome, attempt.peer_status) == ("dead", "dead", "rejected")
    codes = "AR; ERR-3 204, ERR-4 E, ERR-5 NOTFOUND, ERR-2 PID^1^3^1^1"
    assert codes in attempt.detail and codes in (entry.last_error or ""), attempt.detail
    assert "DOE" not in attempt.detail + (entry.last_error or "")
    assert _text(store, attempt) == ("MSA-3: Patient DOE^JOHN not found\nERR-3.2: Unknown key identifier\n"
                                     "ERR-5.2: No patient DOE JOHN\nERR-8: Patient DOE^JOHN not found in MPI")
    assert _plaintext_at_rest(store) == []

    listed = _cli(store, "outbox", "list")
    assert listed.returncode == 0, listed.stderr
    assert "dead rejected *" in listed.stdout and "msgate outbox show" in listed.stdout
    listed_json = _cli(store, "outbox", "list", "--json")
    assert json.loads(listed_json.stdout)[0]["history"][0]["has_peer_text"] is True
    for out in (listed, listed_json):
        assert "DOE" not in out.stdout + out.stderr and "not found" not in out.stdout
    assert _views(store, entry_id) == []  # a list shows no text: nothing to audit

    shown = _cli(store, "outbox", "show", entry_id[:10])
    assert shown.returncode == 0, shown.stderr
    assert "peer: MSA-3: Patient DOE^JOHN not found" in shown.stdout
    assert "peer: ERR-8: Patient DOE^JOHN not found in MPI" in shown.stdout and codes in shown.stdout
    (view,) = _views(store, entry_id)
    assert view.actor.startswith("cli:") and view.detail == {"view": "outbox.show", "attempt_ids": [attempt.id],
                                                              "count": 1}
    doc = json.loads(_cli(store, "outbox", "show", entry_id, "--json").stdout)
    assert doc["history"][0]["peer_text"].startswith("MSA-3: Patient DOE^JOHN not found")
    assert len(_views(store, entry_id)) == 2
    assert _plaintext_at_rest(store) == []  # the views decrypted in memory only


def test_a_transient_nak_and_an_accepted_warning_keep_their_codes(store: Store, engine: Engine) -> None:
    """AE is retried and AA with a warning ERR (ERR-4 W) is delivered, as before; both record the codes."""
    engine.script[:] = [AE, AA_WARNING]
    entry_id = _queue(store)
    outbox.run_once(store, FAST)
    assert _entry(store, entry_id).state == "pending"
    _make_due(store)
    outbox.run_once(store, FAST)
    entry = _entry(store, entry_id)
    nak, accepted = _attempts(store, entry_id)
    assert (entry.state, entry.last_error) == ("delivered", None)
    assert (nak.outcome, nak.peer_status) == ("retry", "nak")
    assert "peer did not accept the message (AE; ERR-3 207, ERR-4 E, ERR-5 LOCK9, ERR-2 PID^1^5)" in nak.detail
    assert _text(store, nak) == "MSA-3: Patient DOE^JOHN locked, try later\nERR-3.2: Application internal error"
    assert (accepted.outcome, accepted.peer_status) == ("delivered", "AA")
    assert accepted.detail.endswith("peer accepted the message (AA; ERR-3 0, ERR-4 W, ERR-5 W17)")
    assert _text(store, accepted) == "ERR-3.2: Message accepted\nERR-5.2: Name differs: DOE"
    assert all("DOE" not in a.detail for a in (nak, accepted))
    assert _plaintext_at_rest(store) == []


def test_a_v23_engine_error_code_and_location_from_err1(store: Store, engine: Engine) -> None:
    engine.script[:] = [V23_AR]
    entry_id = _queue(store)
    outbox.run_once(store, FAST)
    (attempt,) = _attempts(store, entry_id)
    assert attempt.detail.endswith("peer rejected the message (AR; ERR-3 204, ERR-2 PID^1^3)"), attempt.detail
    assert _text(store, attempt) == "MSA-3: Patient DOE^JOHN unknown\nERR-1.4.2: Unknown patient DOE JOHN"
    assert _plaintext_at_rest(store) == []


def test_a_plain_answer_stores_no_text_and_show_audits_nothing(store: Store, engine: Engine) -> None:
    entry_id = _queue(store)
    outbox.run_once(store, FAST)
    (attempt,) = _attempts(store, entry_id)
    assert (attempt.outcome, attempt.peer_text_enc) == ("delivered", None)
    assert attempt.detail.startswith("MSH-10 ") and ":" not in attempt.detail
    shown = _cli(store, "outbox", "show", entry_id[:10])
    assert shown.returncode == 0 and "peer:" not in shown.stdout, shown.stderr
    assert _views(store, entry_id) == []


def _columns(store: Store) -> set[str]:
    with store.db.connect() as conn:
        return {c["name"] for c in inspect(conn).get_columns("outbox_attempt")}


def test_migration_0006_adds_the_encrypted_column_and_removes_it_on_downgrade(store: Store, engine: Engine) -> None:
    engine.script[:] = [AE]
    entry_id = _queue(store)
    outbox.run_once(store, FAST)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with store.db.connect() as conn, conn.begin():
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
    assert store.db.current_revision() == "0005" and "peer_text_enc" not in _columns(store)
    with store.db.connect() as conn:  # the attempt recorded under 0006 keeps its coded detail
        assert "AE; ERR-3 207" in conn.execute(text("SELECT detail FROM outbox_attempt")).scalar_one()
    store.db.upgrade("0006")
    assert store.db.current_revision() == "0006" and "peer_text_enc" in _columns(store)
    (attempt,) = _attempts(store, entry_id)
    assert attempt.peer_text_enc is None  # what the downgrade dropped is gone; nothing in the clear instead
