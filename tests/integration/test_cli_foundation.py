"""The CLI as operators run it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def run(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "MSGATE_HOME": str(home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "msgate", *args], capture_output=True, text=True, env=full_env,
                          timeout=120)


def test_help_lists_groups(tmp_path: Path) -> None:
    result = run(tmp_path, "--help")
    assert result.returncode == 0
    for group in ("keys", "db", "audit", "serve"):
        assert group in result.stdout


def test_keys_lifecycle_and_audit(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run(home, "keys", "init").returncode == 0
    again = run(home, "keys", "init")
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert run(home, "db", "upgrade").returncode == 0
    rotated = run(home, "keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    status = run(home, "keys", "status", "--json")
    assert status.returncode == 0 and status.stdout.count('"id"') == 2
    assert run(home, "audit", "verify").returncode == 0
    with sqlite3.connect(home / "msgate.db") as conn:
        conn.execute("UPDATE audit_event SET actor = 'mallory' WHERE seq = 1")
    broken = run(home, "audit", "verify")
    assert broken.returncode == 1 and "record 1" in broken.stderr


def test_open_key_file_is_refused_cleanly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run(home, "keys", "init")
    os.chmod(home / "keys" / "keyring.json", 0o644)
    result = run(home, "keys", "status")
    assert result.returncode == 2 and "0644" in result.stderr and "Traceback" not in result.stderr


def test_invalid_setting_named_without_traceback(tmp_path: Path) -> None:
    result = run(tmp_path, "keys", "status", env={"MSGATE_DICOM__PORT": "eleven"})
    assert result.returncode == 2
    assert "MSGATE_DICOM__PORT" in result.stderr and "Traceback" not in result.stderr
    debug = run(tmp_path, "--debug", "keys", "status", env={"MSGATE_DICOM__PORT": "eleven"})
    assert "Traceback" in debug.stderr


def test_retire_refuses_a_key_that_still_wraps_a_journal_segment(tmp_path: Path) -> None:
    """A segment of acknowledged instances not yet indexed (the listener crashed) is wrapped by the old
    KEK. Retiring it used to succeed, and the listener then failed at start: the instances were lost."""
    import json

    from msgate.config import load_settings
    from msgate.storage import keyring
    from msgate.storage.journal import Journal

    home = tmp_path / "home"
    assert run(home, "keys", "init").returncode == 0
    assert run(home, "db", "upgrade").returncode == 0
    settings = load_settings(home=home)
    ring = keyring.load(settings.keyring_path)
    journal = Journal(home / "dicom-journal", ring)
    journal.append([b"MGD1 an acknowledged instance"])
    journal.close()  # the process died: the segment stays
    assert run(home, "keys", "rotate").returncode == 0
    refused = run(home, "keys", "retire", ring.active_id)
    assert refused.returncode == 2 and "1 commit-journal segments" in refused.stderr, refused.stderr
    assert len(json.loads(run(home, "keys", "status", "--json").stdout)["keys"]) == 2  # both kept
    for segment in (home / "dicom-journal").glob("*.jnl"):
        segment.unlink()  # indexed (the listener ran)
    assert run(home, "keys", "retire", ring.active_id).returncode == 0


def test_retire_refuses_while_roles_started_before_the_rotation_still_run(tmp_path: Path) -> None:
    """A role loads the key ring once: after `keys rotate` it still wraps new data under the old KEK.
    Retiring that KEK while the role runs lost everything it wrote afterwards."""
    from datetime import timedelta

    from msgate.config import load_settings
    from msgate.storage import heartbeat, keyring
    from msgate.storage.models import utcnow
    from msgate.storage.store import open_store

    home = tmp_path / "home"
    assert run(home, "keys", "init").returncode == 0
    assert run(home, "db", "upgrade").returncode == 0
    old = keyring.load(load_settings(home=home).keyring_path).active_id
    store = open_store(load_settings(home=home, storage={"min_free_bytes": 0}))
    try:
        heartbeat.beat(store.db, ["worker"], utcnow() - timedelta(minutes=5))  # a worker running since before
        assert run(home, "keys", "rotate").returncode == 0
        refused = run(home, "keys", "retire", old)
        assert refused.returncode == 2 and "worker@" in refused.stderr and "restart" in refused.stderr
        heartbeat.clear(store.db, ["worker"])
        heartbeat.beat(store.db, ["worker"], utcnow())  # restarted: it has the new key ring
        assert run(home, "keys", "retire", old).returncode == 0
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_status_before_db_upgrade_is_down_with_json(tmp_path: Path, backend: str,
                                                   request: pytest.FixtureRequest) -> None:
    """A reachable database without msgate's schema (a new home, or a new PostgreSQL database before
    `msgate db upgrade`): the status contract still holds, JSON on stdout and exit 2 (down)."""
    import json

    home = tmp_path / "home"
    env = {"MSGATE_DATABASE_URL": request.getfixturevalue("pg_url")} if backend == "postgres" else {}
    assert run(home, "keys", "init", env=env).returncode == 0
    result = run(home, "status", "--json", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["health"] == "down"
    assert report["database"]["reason"] == "schema missing; run msgate db upgrade"
    quiet = run(home, "status", "--role", "hl7", "--quiet", env=env)
    assert quiet.returncode == 2 and quiet.stdout == "" and "Traceback" not in quiet.stderr
