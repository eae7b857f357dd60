"""``msgate audit verify|head`` on a keyed chain, as operators run them: real subprocesses on embedded SQLite
and the machine's PostgreSQL. The database is changed the way a writer without the key ring would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlmodel import select

from msgate.config import Settings, load_settings
from msgate.storage import audit
from msgate.storage.db import MIGRATIONS, Database
from msgate.storage.models import AuditEvent, AuditHead
from msgate.storage.store import open_store
from tests import audit_forgery as forgery

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def home(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    env = {"MSGATE_DATABASE_URL": request.getfixturevalue("pg_url")} if request.param == "postgres" else {}
    return tmp_path / "home", env


def run(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "MSGATE_HOME": str(home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0", **env}
    return subprocess.run([sys.executable, "-m", "msgate", *args], capture_output=True, text=True, env=full,
                          timeout=120)


def settings_of(home: Path, env: dict[str, str]) -> Settings:
    url = env.get("MSGATE_DATABASE_URL")
    return load_settings(home=home, storage={"min_free_bytes": 0}, **({"database_url": url} if url else {}))


def an_old_database(home: Path, env: dict[str, str], n: int) -> Settings:
    """What the release before keying left: the schema before 0007, ``n`` unkeyed (SHA-256) records."""
    assert run(home, env, "keys", "init").returncode == 0
    settings = settings_of(home, env)
    script = ScriptDirectory(str(MIGRATIONS))
    previous = script.get_revision("0007").down_revision  # the revision before the keying one
    db = Database(settings.resolved_database_url)
    try:
        db.upgrade(str(previous))
        with db.session() as s:
            for i in range(n):
                audit.append(s, kind="test.old", actor="t", subject=f"old:{i}")
    finally:
        db.dispose()
    return settings


def serve_migrates(settings: Settings) -> None:
    """What `msgate serve` does when it starts (open_store with migrate), without running the roles."""
    open_store(settings, create_keys=False).close()


def rewrite_unkeyed(settings: Settings, seq: int) -> None:
    """The attack docs/security.md described: edit record ``seq``, recompute SHA-256 to the head."""
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as s:
            forgery.rewrite(s, seq, key=None)
    finally:
        db.dispose()


def test_an_upgraded_database_verifies_keyed_from_its_marker_and_head_exports_the_tip(home: tuple[Path, dict[str, str]]
                                                                                     ) -> None:
    path, env = home
    settings = an_old_database(path, env, 3)
    assert run(path, env, "db", "upgrade").returncode == 0
    keyed = run(path, env, "audit", "verify")  # db upgrade keyed it (a restore followed by verify, before serve)
    assert keyed.returncode == 0 and "4 records, keyed from seq 4" in keyed.stdout, keyed.stdout + keyed.stderr
    serve_migrates(settings)
    assert run(path, env, "keys", "rotate").returncode == 0  # an audited operator action: record 5, keyed
    intact = run(path, env, "audit", "verify")
    assert intact.returncode == 0 and "5 records, keyed from seq 4" in intact.stdout, intact.stdout + intact.stderr
    as_json = run(path, env, "audit", "verify", "--json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout) == {"ok": True, "checked": 5, "first_bad_seq": None, "reason": "",
                                          "keyed_from": 4}
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as s:
            head = s.get(AuditHead, 1)
            assert head is not None
            tip = {"seq": head.seq, "hash": head.hash, "keyed_from": 4}
    finally:
        db.dispose()
    exported = run(path, env, "audit", "head", "--json")
    assert exported.returncode == 0 and json.loads(exported.stdout) == tip
    text = run(path, env, "audit", "head")
    assert text.returncode == 0 and text.stdout.strip() == f"seq 5 hash {tip['hash']} keyed_from 4"
    assert run(path, env, "keys", "rotate").returncode == 0  # the chain goes on: the shipped head is still in it
    shipped = run(path, env, "audit", "head", "--seq", "5", "--json")
    assert shipped.returncode == 0 and json.loads(shipped.stdout) == tip
    beyond = run(path, env, "audit", "head", "--seq", "7")
    assert beyond.returncode == 1 and "no audit record 7" in beyond.stderr and "Traceback" not in beyond.stderr


def test_the_unkeyed_rewrite_now_fails_verify_with_exit_1(home: tuple[Path, dict[str, str]]) -> None:
    path, env = home
    assert run(path, env, "keys", "init").returncode == 0
    assert run(path, env, "db", "upgrade").returncode == 0
    for _ in range(3):
        assert run(path, env, "keys", "rotate").returncode == 0
    assert run(path, env, "audit", "verify").returncode == 0
    rewrite_unkeyed(settings_of(path, env), 2)
    broken = run(path, env, "audit", "verify")
    assert broken.returncode == 1 and "broken at record 2" in broken.stderr and "Traceback" not in broken.stderr
    as_json = run(path, env, "audit", "verify", "--json")
    assert as_json.returncode == 1
    said = json.loads(as_json.stdout)
    assert said["ok"] is False and said["first_bad_seq"] == 2 and said["keyed_from"] == 1


def test_an_upgraded_chain_stripped_of_its_marker_and_rehashed_fails(home: tuple[Path, dict[str, str]]) -> None:
    """The audit.keyed record's kind changed (no keyed record left) and the chain rehashed from it."""
    path, env = home
    settings = an_old_database(path, env, 2)
    serve_migrates(settings)
    assert run(path, env, "keys", "rotate").returncode == 0
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as s:
            marker = s.exec(select(AuditEvent).where(AuditEvent.kind == audit.MARKER)).one()
            marker.kind, marker.detail = "test.old", {}
            s.add(marker)
    finally:
        db.dispose()
    rewrite_unkeyed(settings, 3)
    broken = run(path, env, "audit", "verify")
    assert broken.returncode == 1 and "not keyed" in broken.stderr and "none of the 4 records" in broken.stderr
    said = json.loads(run(path, env, "audit", "verify", "--json").stdout)
    assert said["ok"] is False and said["first_bad_seq"] is None and said["keyed_from"] is None
    assert json.loads(run(path, env, "audit", "head", "--json").stdout)["keyed_from"] is None
