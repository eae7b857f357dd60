"""Audit anchors as operators meet them: a real ``msgate serve --role scheduler`` records the chain head in
its anchor file and its JSON log, and ``msgate audit verify`` (real subprocesses) checks the chain against
them, on embedded SQLite and the machine's PostgreSQL. The database is changed the way a writer with
database access (and, for the rewrite, the key ring) would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msgate.config import Settings, load_settings
from msgate.storage import audit, keyring
from msgate.storage.db import Database
from msgate.storage.store import open_store
from tests import audit_forgery as forgery

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def home(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    env = {"MSGATE_DATABASE_URL": request.getfixturevalue("pg_url")} if request.param == "postgres" else {}
    return tmp_path / "home", env


def _env(home: Path, env: dict[str, str]) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    full.update({"MSGATE_HOME": str(home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
                 "MSGATE_METRICS__ENABLED": "false", **env})
    return full


def run(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "msgate", *args], capture_output=True, text=True,
                          env=_env(home, env), timeout=120)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def settings_of(home: Path, env: dict[str, str]) -> Settings:
    url = env.get("MSGATE_DATABASE_URL")
    return load_settings(home=home, storage={"min_free_bytes": 0}, **({"database_url": url} if url else {}))


def a_chain(home: Path, env: dict[str, str], records: int) -> Settings:
    """A home with a key ring, a migrated database and ``records`` audit records (set up in this process,
    as ``msgate serve`` would: each msgate subprocess costs seconds on a loaded test machine)."""
    settings = settings_of(home, env)
    keyring.init(settings.keyring_path)
    open_store(settings).close()
    append(settings, records)
    return settings


def append(settings: Settings, n: int) -> None:
    store = open_store(settings, migrate=False, create_keys=False)
    try:
        with store.db.session() as s:
            for i in range(n):
                audit.append(s, kind="test.event", actor="t", subject=f"x:{i}")
    finally:
        store.close()


def cut(settings: Settings, keep: int) -> None:
    """Delete every record after ``keep`` and move the head back to it; nothing else changes."""
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as s:
            forgery.cut(s, keep)
    finally:
        db.dispose()


def rewrite_with_key(settings: Settings, seq: int) -> None:
    """Edit record ``seq`` and recompute every HMAC after it and the head, with the key ring's audit key."""
    store = open_store(settings, migrate=False, create_keys=False)
    try:
        key = audit.key_of(store.db.engine)
        assert key is not None
        with store.db.session() as s:
            forgery.rewrite(s, seq, key=key, actor="cli:mallory")
    finally:
        store.close()


def serve_scheduler(home: Path, env: dict[str, str], log: Path, while_running: int) -> None:
    """Start the scheduler role, wait for its first anchor, add ``while_running`` records, stop it cleanly."""
    anchors = home / "audit-anchors.jsonl"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "msgate", "serve", "--role", "scheduler"],
                                env={**_env(home, env), "MSGATE_AUDIT__ANCHOR_INTERVAL_S": "3600"},
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and proc.poll() is None and not anchors.exists():
                time.sleep(0.2)
            assert anchors.exists(), log.read_text()[-3000:]
            append(settings_of(home, env), while_running)
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(90) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def test_the_scheduler_anchors_the_head_and_verify_finds_the_cut_tail(home: tuple[Path, dict[str, str]],
                                                                      tmp_path: Path) -> None:
    path, env = home
    settings = a_chain(path, env, 2)
    log = tmp_path / "serve.log"
    serve_scheduler(path, env, log, while_running=2)
    anchor_file = path / "audit-anchors.jsonl"
    lines = [json.loads(line) for line in anchor_file.read_text().splitlines()]
    # one at the start (seq 2), one at the clean stop (seq 4); the hour-long interval never came
    assert [(line["event"], line["seq"], line["keyed_from"]) for line in lines] == [("audit.anchor", 2, 1),
                                                                                     ("audit.anchor", 4, 1)]
    logged = [json.loads(line) for line in log.read_text().splitlines() if '"audit.anchor"' in line]
    assert [(d["seq"], d["hash"], d["keyed_from"]) for d in logged] == [(d["seq"], d["hash"], 1) for d in lines]
    assert set(logged[0]) == {"ts", "level", "logger", "msg", "event", "seq", "hash", "keyed_from"}
    tip = json.loads(ok(run(path, env, "audit", "head", "--json")).stdout)
    assert (tip["seq"], tip["hash"]) == (4, lines[-1]["hash"])
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps(tip, indent=2) + "\n")

    intact = ok(run(path, env, "audit", "verify"))
    assert f"4 records, keyed from seq 1; checked against 2 anchors from {anchor_file}" in intact.stdout
    assert "checked against 2 anchors from" in ok(run(path, env, "audit", "verify", "--anchors", str(log))).stdout

    cut(settings, 3)  # seq 4 gone, the head moved back to 3
    unanchored = ok(run(path, {**env, "MSGATE_AUDIT__ANCHOR_FILE": ""}, "audit", "verify"))
    assert "3 records" in unanchored.stdout and "not checked against anchors" in unanchored.stdout  # the old gap
    cut_off = run(path, env, "audit", "verify")
    assert cut_off.returncode == 1 and "Traceback" not in cut_off.stderr, cut_off.stdout + cut_off.stderr
    said = " ".join(cut_off.stderr.split())
    assert (f"truncated: anchored record seq 4 (anchored at {lines[-1]['ts']}) is missing; the chain ends at 3"
            in said), said
    assert f"checked against 2 anchors from {anchor_file}" in cut_off.stdout
    as_json = run(path, env, "audit", "verify", "--json")
    assert as_json.returncode == 1
    doc = json.loads(as_json.stdout)
    assert doc["ok"] is False and doc["first_bad_seq"] == 4 and doc["reason"].startswith("truncated:")
    assert doc["anchors"]["sources"] == [str(anchor_file)] and doc["anchors"]["checked"] == 2
    assert [(f["kind"], f["seq"]) for f in doc["anchors"]["findings"]] == [("truncated", 4)]
    for source in (log, heads):  # the SIEM's log lines, and a head shipped by hand
        found = run(path, env, "audit", "verify", "--anchors", str(source))
        assert found.returncode == 1 and "truncated: anchored record seq 4" in " ".join(found.stderr.split())


def test_a_rewrite_is_found_against_shipped_heads_and_a_garbled_line_is_named(home: tuple[Path, dict[str, str]],
                                                                              tmp_path: Path) -> None:
    path, env = home
    settings = a_chain(path, env, 3)
    heads = tmp_path / "heads.json"
    heads.write_text(ok(run(path, env, "audit", "head", "--json")).stdout)  # seq 3
    append(settings, 1)
    with heads.open("a") as fh:
        fh.write(ok(run(path, env, "audit", "head", "--json")).stdout)  # seq 4
    rewrite_with_key(settings, 2)
    store = open_store(settings, migrate=False, create_keys=False)
    try:
        with store.db.session() as s:
            assert audit.verify(s).ok  # the chain alone cannot show it
    finally:
        store.close()
    rewritten = run(path, env, "audit", "verify", "--anchors", str(heads))
    assert rewritten.returncode == 1, rewritten.stdout + rewritten.stderr
    assert "checked against 2 anchors" in rewritten.stdout
    assert "rewritten: record seq 3 does not have its anchored hash (1 more findings)" in " ".join(
        rewritten.stderr.split())

    torn = tmp_path / "torn.jsonl"
    torn.write_text(heads.read_text() + '{"event": "audit.anchor", "seq": 5, "ha')
    garbled = run(path, env, "audit", "verify", "--anchors", str(torn))  # the torn line named, the rest checked
    said = " ".join(garbled.stderr.split())
    assert garbled.returncode == 1 and "Traceback" not in said, garbled.stdout + garbled.stderr
    assert "is not a JSON anchor" in said and "rewritten: record seq 3" in said
    torn.write_text('{"event": "audit.anchor", "seq": 5, "ha')  # nothing but a torn line: nothing to check
    only_torn = run(path, env, "audit", "verify", "--anchors", str(torn))
    assert only_torn.returncode == 2 and "is not a JSON anchor" in " ".join(only_torn.stderr.split())
    missing = run(path, env, "audit", "verify", "--anchors", str(tmp_path / "nowhere.jsonl"))
    assert missing.returncode == 2 and "cannot read the anchors file" in " ".join(missing.stderr.split())
    (path / "audit-anchors.jsonl").write_text("not json, but it names audit.anchor\n")
    configured = run(path, env, "audit", "verify")
    said = " ".join(configured.stderr.split())
    assert configured.returncode == 2 and "MSGATE_AUDIT__ANCHOR_FILE" in said and "Traceback" not in said
