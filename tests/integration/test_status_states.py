"""`msgate status --json` against a running system in each state: healthy, a worker killed, the broker
down, and the PACS down with a backlog. Real processes: each role is its own `msgate serve --role R`,
the broker is a private redis-server on a free port (so stopping it harms nobody else)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from msgate.config import load_settings
from msgate.results.outbox import Rendered, enqueue
from msgate.storage.models import Job
from msgate.storage.store import open_store
from tests.dicom_factory import mr_slice
from tests.integration.pacs_peers import free_port, wait_port

pytestmark = [pytest.mark.integration, pytest.mark.redis, pytest.mark.slow]
ROLES = ("dicom", "hl7", "scheduler", "worker", "publish")


def status(env: dict[str, str]) -> tuple[int, dict]:  # type: ignore[type-arg]
    out = subprocess.run([sys.executable, "-m", "msgate", "status", "--json"], env=env, capture_output=True,
                         text=True, timeout=120)
    return out.returncode, json.loads(out.stdout)


def wait_status(env: dict[str, str], want: int, timeout: float = 120.0,
                until: object = None) -> dict:  # type: ignore[type-arg]
    """Poll until the exit code is ``want`` and ``until(report)`` holds (a loaded CI box is slow)."""
    deadline = time.monotonic() + timeout
    while True:
        code, report = status(env)
        if (code == want and (until is None or until(report))) or time.monotonic() > deadline:  # type: ignore[operator]
            assert code == want and (until is None or until(report)), json.dumps(report, indent=1)  # type: ignore[operator]
            return report
        time.sleep(2)


@pytest.fixture
def system(tmp_path: Path) -> Iterator[tuple[dict[str, str], dict[str, subprocess.Popen[bytes]], subprocess.Popen[bytes]]]:
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(redis_port)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    env.update({"MSGATE_HOME": str(home), "MSGATE_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
                "MSGATE_DICOM__PORT": str(free_port()), "MSGATE_HL7__PORT": str(free_port()),
                "MSGATE_METRICS__ENABLED": "false", "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
                "MSGATE_STORAGE__PURGE_FREE_BYTES": "0",
                "MSGATE_PACS": json.dumps([{"name": "pacs", "host": "127.0.0.1", "port": free_port(),
                                            "ae_title": "DOWN"}])})
    subprocess.run([sys.executable, "-m", "msgate", "keys", "init"], env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "msgate", "db", "upgrade"], env=env, check=True, capture_output=True)
    procs = {role: subprocess.Popen([sys.executable, "-m", "msgate", "serve", "--role", role], env=env,
                                    stdout=(tmp_path / f"{role}.log").open("wb"), stderr=subprocess.STDOUT,
                                    start_new_session=True) for role in ROLES}
    try:
        yield env, procs, redis
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        redis.kill()


def test_status_in_each_state(system: tuple) -> None:  # type: ignore[type-arg]
    env, procs, redis = system
    healthy = wait_status(env, 0, timeout=240, until=lambda r: r["broker"]["workers"]
                          and r["roles"]["worker"].get("device"))
    assert all(healthy["roles"][r]["health"] == "ok" for r in ROLES)
    assert healthy["roles"]["worker"]["device"] == "cpu"

    # The PACS is down and a result waits: backlog with the peer's error, degraded.
    settings = load_settings(home=Path(env["MSGATE_HOME"]), storage={"min_free_bytes": 0},
                             pacs=json.loads(env["MSGATE_PACS"]))
    store = open_store(settings, migrate=False, create_keys=False)
    stored = store.ingest.store_instance(source=mr_slice(), calling_aet="TEST")
    with store.db.session() as session:
        job = Job(study_id=stored.study_id, idem_key="status-test", state="done", model_version="test")
        session.add(job)
        session.flush()
        enqueue(store, session, job_id=job.id, objects=[Rendered("out.sr", mr_slice())])
    store.close()
    backlog = wait_status(env, 1, timeout=120, until=lambda r: r["outbox"]["recent_errors"])
    assert backlog["outbox"]["backlog"] == 1 and backlog["outbox"]["health"] == "degraded"
    assert all(backlog["roles"][r]["health"] == "ok" for r in ROLES), backlog["roles"]

    # A worker killed: its heartbeat goes stale and Celery's ping gets no answer.
    os.killpg(procs["worker"].pid, signal.SIGKILL)
    dead_worker = wait_status(env, 1, timeout=120, until=lambda r: r["roles"]["worker"]["health"] == "down")
    # The publish role's own Celery consumer still answers the ping; the GPU worker no longer does.
    gone = set(healthy["broker"]["workers"]) - set(dead_worker["broker"]["workers"])
    assert gone and all(not name.startswith("publish") for name in gone), (healthy["broker"], dead_worker["broker"])

    # The broker down.
    redis.kill()
    redis.wait(10)
    broker_down = wait_status(env, 1, timeout=60)
    assert broker_down["broker"]["health"] == "down"

    # Everything stopped: down.
    for role, proc in procs.items():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    down = wait_status(env, 2, timeout=60)
    assert down["health"] == "down"


def test_a_listener_whose_port_does_not_answer_is_degraded(tmp_path: Path) -> None:
    """A fresh heartbeat counted as healthy even when the DICOM port did not answer (listener thread dead,
    process alive), so compose's `status --role dicom --quiet` health check passed."""
    import socket

    from msgate.storage import heartbeat
    from msgate.storage.models import utcnow

    home, port = tmp_path / "home", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    env.update({"MSGATE_HOME": str(home), "MSGATE_DICOM__PORT": str(port), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
                "MSGATE_STORAGE__PURGE_FREE_BYTES": "0"})
    subprocess.run([sys.executable, "-m", "msgate", "keys", "init"], env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "msgate", "db", "upgrade"], env=env, check=True, capture_output=True)
    store = open_store(load_settings(home=home, storage={"min_free_bytes": 0}), migrate=False, create_keys=False)
    try:
        heartbeat.beat(store.db, ["dicom"], utcnow())  # a live dicom role, on this host, with nothing bound
        out = subprocess.run([sys.executable, "-m", "msgate", "status", "--role", "dicom", "--json"], env=env,
                             capture_output=True, text=True, timeout=120)
        report = json.loads(out.stdout)
        assert out.returncode == 1, report
        assert report["roles"]["dicom"]["health"] == "degraded" and report["roles"]["dicom"]["port_open"] is False
        assert str(port) in report["roles"]["dicom"]["reason"]
        with socket.socket() as listening:  # the port answers: healthy
            listening.bind(("127.0.0.1", port))
            listening.listen()
            heartbeat.beat(store.db, ["dicom"], utcnow())  # fresh again: status calls take a while on a loaded box
            out = subprocess.run([sys.executable, "-m", "msgate", "status", "--role", "dicom", "--quiet"], env=env,
                                 capture_output=True, text=True, timeout=120)
            why = "" if out.returncode == 0 else subprocess.run(
                [sys.executable, "-m", "msgate", "status", "--role", "dicom", "--json"], env=env,
                capture_output=True, text=True, timeout=120).stdout
        assert out.returncode == 0, why
    finally:
        store.close()
