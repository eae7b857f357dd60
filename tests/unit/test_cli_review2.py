"""Second CLI review: the audit actor is the OS account, not $USER; commands other than serve and
``db upgrade`` refuse a database of another schema revision instead of migrating it; ``--job`` takes the
prefix that lists show; trace shows dates; limits and states are range-checked (typer's CliRunner on a
real store)."""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlmodel import select
from typer.testing import CliRunner, Result

from msgate.cli import (
    audit_cmd,
    common,
    db_cmd,
    jobs_cmd,
    messages_cmd,
    outbox_cmd,
    status_probe,
    studies_cmd,
    trace_cmd,
)
from msgate.cli.common import State
from msgate.config import Settings, load_settings
from msgate.errors import ConfigError
from msgate.storage import audit, keyring
from msgate.storage.db import MIGRATIONS, Database
from msgate.storage.models import AuditEvent, Blob, Job, OutboxAttempt, OutboxEntry, utcnow
from msgate.storage.store import Store, open_store
from tests.dicom_factory import mr_slice

JOB = "bbbbbbbbbbbb" + "2" * 20
OTHER = "bbbbbbbbbbbc" + "3" * 20
ACCOUNT = pwd.getpwuid(os.geteuid()).pw_name
HEAD = ScriptDirectory(str(MIGRATIONS)).get_current_head()  # this msgate's schema revision


@pytest.fixture
def cstore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    monkeypatch.setattr(common.console, "_width", 240)
    st = open_store(load_settings(home=tmp_path / "home", storage={"min_free_bytes": 0, "purge_free_bytes": 0}))
    yield st
    st.close()


def _cli(settings: Settings, app: typer.Typer | Callable[..., Any], args: list[str],
         env: dict[str, str] | None = None) -> Result:
    if not isinstance(app, typer.Typer):
        single = typer.Typer()
        single.command()(app)
        app = single
    return CliRunner().invoke(app, args, obj=State(settings), env=env)


def _outbox(store: Store) -> None:
    """Two jobs of one study whose ids share 11 characters; three entries of JOB, days apart."""
    study_id = store.ingest.store_instance(source=mr_slice(accession="ACC1")).study_id
    now = utcnow()
    with store.db.session() as session:
        blob = session.exec(select(Blob)).first()
        assert blob is not None
        session.add(Job(id=JOB, study_id=study_id, idem_key="k1", state="done", created_at=now - timedelta(days=4)))
        session.add(Job(id=OTHER, study_id=study_id, idem_key="k2", state="failed", created_at=now))
        session.flush()
        for n, (state, dest) in enumerate((("dead", "pacs"), ("pending", "ris"), ("delivered", "pacs"))):
            entry = OutboxEntry(id=f"e{n}" + "c" * 30, job_id=JOB, kind="sr", destination=dest, blob_id=blob.id,
                                state=state, attempts=1, created_at=now - timedelta(days=3))
            session.add(entry)
            session.flush()
            session.add(OutboxAttempt(entry_id=entry.id, outcome="failed", peer_status="0xA700",
                                      started_at=now - timedelta(days=3 - n)))


# --- 1. the audit actor ----------------------------------------------------------------------------------


def test_the_actor_is_the_effective_os_account_not_logname(monkeypatch: pytest.MonkeyPatch) -> None:
    """getpass.getuser() read $LOGNAME first: anyone could record another person's name."""
    monkeypatch.setenv("LOGNAME", "dr_someone_else")
    monkeypatch.setenv("USER", "dr_someone_else")
    monkeypatch.delenv("SUDO_USER", raising=False)
    assert audit.operator() == f"cli:{ACCOUNT}"


def test_under_sudo_the_actor_adds_the_invoking_account(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGNAME", "msgate")
    monkeypatch.setenv("SUDO_USER", "alice")
    assert audit.operator() == f"cli:{ACCOUNT} (sudo alice)"
    monkeypatch.setenv("SUDO_USER", "x" * 200)  # never past the 64-character column
    long = audit.operator()
    assert len(long) == 64 and long.startswith(f"cli:{ACCOUNT} (sudo xx") and long.endswith(")")
    monkeypatch.setenv("SUDO_USER", ACCOUNT)  # `sudo` to oneself adds nothing
    assert audit.operator() == f"cli:{ACCOUNT}"


def test_an_account_without_a_passwd_entry_is_named_by_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(uid: int) -> None:
        raise KeyError(uid)

    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.setattr(audit.pwd, "getpwuid", missing)
    assert audit.operator() == f"cli:uid{os.geteuid()}"


def test_a_phi_view_records_the_os_account(cstore: Store) -> None:
    cstore.ingest.store_instance(source=mr_slice(accession="ACC1"))
    out = _cli(cstore.settings, studies_cmd.app, ["show", "1"], env={"LOGNAME": "dr_x", "USER": "dr_x",
                                                                       "SUDO_USER": "alice"})
    assert out.exit_code == 0, out.output
    with cstore.db.session() as session:
        actors = session.exec(select(AuditEvent.actor).where(AuditEvent.kind == "phi.view")).all()
    assert actors == [f"cli:{ACCOUNT} (sudo alice)"]


# --- 2. schema revisions -----------------------------------------------------------------------------------


def _home_at(tmp_path: Path, revision: str) -> Settings:
    settings = load_settings(home=tmp_path / "old", storage={"min_free_bytes": 0, "purge_free_bytes": 0})
    keyring.init(settings.keyring_path)
    db = Database(settings.resolved_database_url)
    db.upgrade(revision)
    db.dispose()
    return settings


def _revision(settings: Settings) -> str | None:
    db = Database(settings.resolved_database_url)
    try:
        return db.current_revision()
    finally:
        db.dispose()


def _stamp(settings: Settings, revision: str) -> None:
    db = Database(settings.resolved_database_url)
    with db.connect() as conn, conn.begin():
        conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    db.dispose()


def test_a_read_only_command_refuses_an_older_schema_instead_of_migrating_it(tmp_path: Path) -> None:
    """`audit verify` on a restored older backup silently migrated it."""
    settings = _home_at(tmp_path, "0003")
    out = _cli(settings, audit_cmd.app, ["verify"])
    assert isinstance(out.exception, ConfigError), out.output
    said = str(out.exception)
    assert "0003" in said and HEAD in said and "msgate db upgrade" in said
    assert _revision(settings) == "0003"  # untouched
    up = _cli(settings, db_cmd.app, ["upgrade"])
    assert up.exit_code == 0, up.output
    assert _cli(settings, audit_cmd.app, ["verify"]).exit_code == 0


def test_a_newer_schema_is_refused_by_name_by_every_command(cstore: Store) -> None:
    """A database migrated by a newer msgate: every command said "unexpected CommandError"."""
    _stamp(cstore.settings, "0099")
    for app, args in ((studies_cmd.app, ["list"]), (audit_cmd.app, ["verify"]), (db_cmd.app, ["upgrade"]),
                      (jobs_cmd.app, ["list"])):
        out = _cli(cstore.settings, app, args)
        assert isinstance(out.exception, ConfigError), (args, out.exception)
        said = str(out.exception)
        assert "0099" in said and HEAD in said and "newer msgate" in said, said
    assert _revision(cstore.settings) == "0099"


def test_a_fresh_home_is_not_created_by_a_read_only_command(tmp_path: Path) -> None:
    """Only serve and `db upgrade` create the schema; a listing left a migrated msgate.db behind."""
    settings = load_settings(home=tmp_path / "fresh", storage={"min_free_bytes": 0})
    keyring.init(settings.keyring_path)
    out = _cli(settings, studies_cmd.app, ["list"])
    assert isinstance(out.exception, ConfigError) and "msgate db upgrade" in str(out.exception)
    assert not (settings.home / "msgate.db").exists()


def test_serve_still_migrates_an_older_schema(tmp_path: Path) -> None:
    settings = _home_at(tmp_path, "0003")
    store = State(settings).store(create_keys=True)  # what `msgate serve` calls
    store.close()
    assert _revision(settings) == HEAD


def test_status_reports_another_revision_as_degraded(tmp_path: Path) -> None:
    """It said ok while every other command failed on the database."""
    settings = _home_at(tmp_path, "0003")
    db = Database(settings.resolved_database_url)
    try:
        report = status_probe.database(db)
    finally:
        db.dispose()
    assert report["health"] == "degraded" and report["revision"] == "0003"
    assert report["expected"] == HEAD and "msgate db upgrade" in report["reason"]


def test_db_current_notes_a_revision_that_is_not_this_msgates(tmp_path: Path) -> None:
    settings = _home_at(tmp_path, "0003")
    out = _cli(settings, db_cmd.app, ["current"])
    assert out.exit_code == 0 and out.stdout.strip() == "0003"
    assert "msgate db upgrade" in out.stderr


# --- 3. job id prefixes --------------------------------------------------------------------------------


def test_outbox_list_and_retry_take_the_job_id_as_listed(cstore: Store) -> None:
    """The list shows 12 characters of the job id; --job matched only the full id: [] and exit 0."""
    _outbox(cstore)
    listed = _cli(cstore.settings, outbox_cmd.app, ["list", "--job", JOB[:12], "--json"])
    assert listed.exit_code == 0, listed.output
    assert sorted(r["id"][:2] for r in json.loads(listed.output)) == ["e0", "e1", "e2"]
    retried = _cli(cstore.settings, outbox_cmd.app, ["retry", "--job", JOB[:12], "--json"])
    assert retried.exit_code == 0, retried.output
    assert sorted(json.loads(retried.output)["requeued"]) == ["e0" + "c" * 30, "e1" + "c" * 30]


def test_an_ambiguous_or_unknown_job_prefix_is_said(cstore: Store) -> None:
    _outbox(cstore)
    ambiguous = _cli(cstore.settings, outbox_cmd.app, ["list", "--job", JOB[:11]])
    assert ambiguous.exit_code == 1 and "matches several jobs" in ambiguous.output
    unknown = _cli(cstore.settings, outbox_cmd.app, ["drop", "--job", "ffff"])
    assert unknown.exit_code == 1 and "no job ffff" in unknown.output
    shown = _cli(cstore.settings, jobs_cmd.app, ["show", JOB[:11]])
    assert shown.exit_code == 1 and "matches several jobs" in shown.output
    wildcard = _cli(cstore.settings, jobs_cmd.app, ["show", "%3"])  # not a LIKE pattern
    assert wildcard.exit_code == 1 and "no job %3" in wildcard.output


# --- 4. trace dates --------------------------------------------------------------------------------------


def test_trace_table_shows_the_date_of_each_event(cstore: Store) -> None:
    """Only the time of day was shown: attempts three days apart read as one afternoon."""
    _outbox(cstore)
    out = _cli(cstore.settings, trace_cmd.command, [JOB])
    assert out.exit_code == 0, out.output
    now = utcnow()
    days = {f"{now - timedelta(days=n):%Y-%m-%d}" for n in (1, 2, 3)}
    rows = [line for line in out.output.splitlines() if "attempt failed" in line]
    assert len(rows) == 3 and {d for d in days if any(d in r for r in rows)} == days


def test_trace_time_format() -> None:
    assert trace_cmd.when("2025-03-04T11:23:05.123456+00:00") == "2025-03-04 11:23:05.123"
    assert trace_cmd.when("2025-03-04T12:23:05+01:00") == "2025-03-04 11:23:05.000"
    assert trace_cmd.when(None) == ""


# --- 5. limits and states --------------------------------------------------------------------------------


@pytest.mark.parametrize("app,args", [
    (studies_cmd.app, ["list", "--limit", "-1"]),
    (jobs_cmd.app, ["list", "--limit", "-1"]),
    (outbox_cmd.app, ["list", "-n", "-1"]),
    (messages_cmd.app, ["list", "-n", "-1"]),
    (audit_cmd.app, ["tail", "-n", "-1"]),
    (audit_cmd.app, ["tail", "-n", "0"]),
])
def test_a_negative_limit_is_a_usage_error(cstore: Store, app: typer.Typer, args: list[str]) -> None:
    """SQLite read -1 as no limit at all; PostgreSQL failed with "unexpected DataError"."""
    out = _cli(cstore.settings, app, args)
    assert out.exit_code == 2 and ("'-n'" in out.output or "'--limit'" in out.output), out.output


@pytest.mark.parametrize("app,args,valid", [
    (studies_cmd.app, ["list", "--state", "done"], "receiving"),
    (jobs_cmd.app, ["list", "--state", "error"], "failed"),
    (outbox_cmd.app, ["list", "--state", "failed"], "dead"),
    (messages_cmd.app, ["list", "--state", "failed"], "mapped"),
])
def test_an_unknown_state_is_a_usage_error_naming_the_states(cstore: Store, app: typer.Typer, args: list[str],
                                                               valid: str) -> None:
    """An unknown state listed nothing, exit 0: the operator read "no failed jobs"."""
    out = _cli(cstore.settings, app, args)
    assert out.exit_code == 2 and valid in out.output, out.output


def test_a_valid_state_still_filters(cstore: Store) -> None:
    _outbox(cstore)
    out = _cli(cstore.settings, jobs_cmd.app, ["list", "--state", "failed", "--json", "--limit", "1"])
    assert out.exit_code == 0, out.output
    assert [d["id"] for d in json.loads(out.output)] == [OTHER]
    dead = _cli(cstore.settings, outbox_cmd.app, ["list", "--state", "dead", "--json"])
    assert [d["id"][:2] for d in json.loads(dead.output)] == ["e0"]


def test_the_purge_threshold_degrades_disk_health_only_with_local_blobs(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With PostgreSQL blob bodies the local purge threshold (5 GiB by default) still degraded every role's
    status, so every container's health check failed on a home volume with 2-5 GiB free."""
    from msgate.cli import status_probe
    from msgate.config import load_settings

    monkeypatch.setattr(status_probe, "free_bytes", lambda _path: 3 * 1024**3)
    local = load_settings(home=tmp_path, storage={"min_free_bytes": 2 * 1024**3, "purge_free_bytes": 5 * 1024**3})
    assert status_probe.disk(local)["health"] == "degraded" and "purge" in status_probe.disk(local)["reason"]
    pg = load_settings(home=tmp_path, database_url="postgresql+psycopg://u@127.0.0.1/x",
                       storage={"blob_backend": "postgres", "min_free_bytes": 2 * 1024**3,
                                "purge_free_bytes": 5 * 1024**3})
    assert status_probe.disk(pg) == {**status_probe.disk(pg), "health": "ok", "reason": ""}


def test_keys_rotate_refuses_another_schema_before_it_changes_the_key_ring(tmp_path: Path) -> None:
    """`keys rotate` saved a new KEK and only then met the schema check: the operator was told to upgrade
    the database with the ring already rotated and nothing re-wrapped (each retry added another KEK)."""
    from msgate.cli import keys_cmd

    settings = _home_at(tmp_path, "0003")
    before = keyring.load(settings.keyring_path)
    out = _cli(settings, keys_cmd.app, ["rotate"])
    assert isinstance(out.exception, ConfigError) and "0003" in str(out.exception), out.output
    after = keyring.load(settings.keyring_path)
    assert [k.id for k in after.keks] == [k.id for k in before.keks] and after.active_id == before.active_id


def test_status_and_db_current_on_a_fresh_home_create_nothing(tmp_path: Path) -> None:
    """`status` (or `db current`) run first on a fresh embedded home created an empty msgate.db; the home
    then looked used, and the first `serve` refused to set up its key ring ("run msgate keys init")."""
    from msgate.cli import status_cmd

    settings = load_settings(home=tmp_path / "fresh", storage={"min_free_bytes": 0, "purge_free_bytes": 0})
    report = status_cmd.collect(settings)
    assert report["database"] == {"backend": "sqlite", "health": "down",
                                  "reason": "schema missing; run msgate db upgrade"}
    assert _cli(settings, db_cmd.app, ["current"]).output.startswith("empty")
    assert not (tmp_path / "fresh" / "msgate.db").exists()
    open_store(settings).close()  # what a first serve does: sets the home up, key ring included
    assert settings.keyring_path.exists()
