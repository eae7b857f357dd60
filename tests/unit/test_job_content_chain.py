"""Job keys on both backends: a content that comes back after a correction gets a job again, two schedulers
still create one job for one change (PostgreSQL, real concurrent transactions), and revision 0009 upgrades
and downgrades with jobs in the table."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings
from sqlalchemy import inspect, text
from sqlmodel import select

from msgate.storage.models import Job, Study, new_id
from msgate.storage.store import Store, open_store
from msgate.workers import jobs


@pytest.fixture
def jstore(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Store:
    pg = request.getfixturevalue("pg_url") if backend == "postgres" else None
    home = tmp_path / "home"
    if backend == "postgres":
        from msgate.storage import keyring

        keyring.init(home / "keys" / "keyring.json")
    st = open_store(make_settings(home, backend, pg))
    request.addfinalizer(st.close)
    return st


def _study(store: Store) -> int:
    with store.db.session() as session:
        study = Study(study_uid_index=new_id(), state="ready")
        session.add(study)
        session.flush()
        assert study.id is not None
        return study.id


def _create(store: Store, study_id: int, content: str) -> Job | None:
    return jobs.create(store.db, study_id=study_id, idem_key=content, model_version="m", flags={})


def _create_nth(store: Store, study_id: int, keys: list[str], i: int) -> Job | None:
    return _create(store, study_id, keys[i])


def _chain(store: Store, study_id: int) -> list[Job]:
    with store.db.session() as session:
        return list(session.exec(select(Job).where(Job.study_id == study_id)
                                 .order_by(Job.created_at)).all())  # type: ignore[arg-type]


def _concurrently(n: int, call: Callable[[int], Any]) -> list[Any]:
    """``n`` threads, each on its own connection, released together."""
    barrier, out, errors = threading.Barrier(n), [None] * n, []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            out[i] = call(i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return out


def test_a_content_that_comes_back_gets_a_job_again(jstore: Store) -> None:
    study_id = _study(jstore)
    first = _create(jstore, study_id, "X")
    assert first is not None and _create(jstore, study_id, "X") is None
    second = _create(jstore, study_id, "Y")
    assert second is not None and second.supersedes_id == first.id
    third = _create(jstore, study_id, "X")  # the correction was corrected: job1's data again
    assert third is not None and third.supersedes_id == second.id and third.content_key == "X"
    assert _create(jstore, study_id, "X") is None and _create(jstore, study_id, "Y") is not None
    assert [j.state for j in _chain(jstore, study_id)] == ["superseded", "superseded", "superseded", "queued"]


def test_the_same_content_as_the_newest_job_records_the_readiness_it_was_planned_at(jstore: Store) -> None:
    from datetime import timedelta

    from msgate.storage.models import utcnow

    study_id = _study(jstore)
    ready = utcnow() - timedelta(minutes=5)
    job = jobs.create(jstore.db, study_id=study_id, idem_key="X", model_version="m", flags={}, ready_at=ready)
    assert job is not None and job.planned_ready_at is None
    again = ready + timedelta(minutes=1)
    assert jobs.create(jstore.db, study_id=study_id, idem_key="X", model_version="m", flags={},
                       ready_at=again) is None
    assert jobs.create(jstore.db, study_id=study_id, idem_key="X", model_version="m", flags={},
                       ready_at=ready) is None  # an older readiness never moves the mark back
    [row] = _chain(jstore, study_id)
    assert row.planned_ready_at == again and row.state == "queued"


@pytest.mark.parametrize("contents", [("X", "X", "X", "X"), ("Y", "Z", "Y", "Z")], ids=["same", "different"])
def test_two_schedulers_leave_one_active_job(jstore: Store, contents: tuple[str, ...]) -> None:
    """Schedulers creating for one study at the same moment: one job per change, and never two active jobs
    (the unique key guarded only the same content; a second change forked the chain)."""
    for _ in range(3):
        study_id = _study(jstore)
        first = _create(jstore, study_id, f"{study_id}A")  # a real key names its study (its UID's index)
        assert first is not None
        keys = [f"{study_id}{c}" for c in contents]
        made = [j for j in _concurrently(len(keys), partial(_create_nth, jstore, study_id, keys)) if j]
        chain = _chain(jstore, study_id)
        assert [j.state for j in chain].count("queued") == 1, [(j.content_key, j.state) for j in chain]
        if len(set(contents)) == 1:
            assert len(made) == 1 and len(chain) == 2
        # a linear chain: each job supersedes the one created before it
        assert [j.supersedes_id for j in chain] == [None] + [j.id for j in chain[:-1]]


def test_the_unique_key_is_the_backstop(jstore: Store) -> None:
    """The key a create would write is already taken (a scheduler that read the chain before another one
    committed): IntegrityError, nothing created, no error raised."""
    taken, study_id = _study(jstore), _study(jstore)
    with jstore.db.session() as session:
        session.add(Job(study_id=taken, idem_key=jobs.chain_key("X", None), content_key="X"))
    assert _create(jstore, study_id, "X") is None
    assert _chain(jstore, study_id) == []
    assert _create(jstore, study_id, "Y") is not None


def _migrate(store: Store, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    from msgate.storage.db import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with store.db.connect() as conn, conn.begin():
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def _job_columns(store: Store) -> set[str]:
    with store.db.connect() as conn:
        return {c["name"] for c in inspect(conn).get_columns("job")}


def _keys(store: Store) -> dict[str, str]:
    with store.db.connect() as conn:
        return dict(conn.execute(text("SELECT id, idem_key FROM job")).all())  # type: ignore[arg-type]


def test_migration_0009_up_and_down_with_jobs(jstore: Store) -> None:
    study_id = _study(jstore)
    _migrate(jstore, "0008")
    assert not {"content_key", "planned_ready_at"} & _job_columns(jstore)
    with jstore.db.connect() as conn, conn.begin():  # a job of the older code: keyed by its content
        conn.execute(text("INSERT INTO job (id, study_id, idem_key, state, model_version, flags, stages, attempts,"
                          " created_at) VALUES ('legacy', :sid, 'X', 'done', 'm', '{}', '{}', 1, :now)"),
                     {"sid": study_id, "now": "2026-01-01 00:00:00+00:00"})
    jstore.db.upgrade("0009")
    assert {"content_key", "planned_ready_at"} <= _job_columns(jstore)
    [legacy] = _chain(jstore, study_id)
    assert legacy.content_key == "X"
    assert _create(jstore, study_id, "X") is None  # the older job's content is still known
    second = _create(jstore, study_id, "Y")
    third = _create(jstore, study_id, "X")
    assert second is not None and third is not None and third.supersedes_id == second.id

    _migrate(jstore, "0008")
    assert jstore.db.current_revision() == "0008"
    assert not {"content_key", "planned_ready_at"} & _job_columns(jstore)
    keys = _keys(jstore)  # each content's newest job holds the content key, as the older code looks it up
    assert (keys[third.id], keys[second.id]) == ("X", "Y")
    assert keys["legacy"] == jobs.chain_key("X", None) and len(set(keys.values())) == 3

    jstore.db.upgrade()
    assert _create(jstore, study_id, "X") is None  # the newest job's content survived the round trip
    assert _create(jstore, study_id, "Y") is not None
