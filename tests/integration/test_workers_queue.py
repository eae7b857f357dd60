"""Scheduler + a real Celery worker (``msgate serve --role worker`` in a subprocess, never eager), on
Redis + PostgreSQL and on the embedded SQLite transport. The model is the test double
(``test_workers_double``), so these tests are about queue semantics, not model quality."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import test_workers_double as double
from conftest import REDIS_URL, free_port, make_settings
from sqlmodel import col, select

from msgate.config import Settings
from msgate.storage import audit
from msgate.storage.models import AuditEvent, Job, Result
from msgate.storage.store import Store, open_store
from msgate.workers.celery_app import PUBLISH_QUEUE, build_app
from msgate.workers.results_io import read_result
from msgate.workers.scheduler import Scheduler

HERE = Path(__file__).resolve().parent
FAST = {"model_module": "test_workers_double", "ehr_deadline_seconds": 0, "scan_seconds": 0.5,
        "publish_grace_seconds": 0, "batch_wait_seconds": 0.05, "soft_time_limit": 8, "hard_time_limit": 10,
        "visibility_timeout": 12, "required_ehr_fields": []}

pytestmark = [pytest.mark.integration]


@dataclass
class Rig:
    settings: Settings
    store: Store
    env: dict[str, str]
    sched: Scheduler
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start_worker(self, **extra_env: str) -> subprocess.Popen[bytes]:
        log = self.settings.home / f"worker{len(self.procs)}.log"
        proc = subprocess.Popen([sys.executable, "-m", "msgate", "serve", "--role", "worker"],
                                env={**self.env, **extra_env}, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def jobs(self) -> list[Job]:
        with self.store.db.session() as session:
            return list(session.exec(select(Job).order_by(col(Job.created_at))).all())

    def results(self, job_id: str) -> int:
        with self.store.db.session() as session:
            return len(session.exec(select(Result.id).where(Result.job_id == job_id)).all())

    def wait(self, cond: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            time.sleep(0.2)
        tail = "\n".join(p.read_text(errors="replace")[-3000:] for p in self.logs)
        raise AssertionError(f"timed out waiting for {what}; jobs: "
                             f"{[(j.id[:8], j.state, j.error) for j in self.jobs()]}\n{tail}")

    def settled(self, n: int) -> Callable[[], bool]:
        return lambda: len(js := self.jobs()) >= n and all(j.state in ("done", "failed", "superseded") for j in js)

    def publish_depth(self) -> int:
        if self.settings.broker_url:  # kombu's passive declare misses global_keyprefix; ask Redis directly
            import redis

            client = redis.Redis.from_url(self.settings.broker_url)
            return int(client.llen(f"{self.settings.workers.queue_prefix}{PUBLISH_QUEUE}"))
        with self.sched.app.connection_for_write() as conn:
            return int(conn.default_channel.queue_declare(PUBLISH_QUEUE, passive=True).message_count)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.store.close()


def settings_env(settings: Settings, workers: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    env.update({"MSGATE_HOME": str(settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
                "MSGATE_BROKER_URL": settings.resolved_broker_url if settings.broker_url else "",
                "MSGATE_LOG_FORMAT": "kv", "PYTHONPATH": os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])})
    if not settings.broker_url:
        env.pop("MSGATE_BROKER_URL")
    if settings.database_url:
        env["MSGATE_DATABASE_URL"] = settings.database_url
        env["MSGATE_STORAGE__BLOB_BACKEND"] = settings.storage.blob_backend
    for key, value in workers.items():
        env[f"MSGATE_WORKERS__{key.upper()}"] = str(value) if not isinstance(value, list) else str(value).replace("'", '"')
    return env


def make_rig(tmp_path: Path, kind: str, pg: str | None, broker: str | None = None, **workers: Any) -> Rig:
    cfg = {**FAST, **workers}
    home = tmp_path / "home"
    if kind == "redis":
        from msgate.storage import keyring

        keyring.init(home / "keys" / "keyring.json")
        cfg["queue_prefix"] = f"msgate-test-{uuid.uuid4().hex[:8]}:"
        settings = make_settings(home, "postgres", pg, broker_url=broker or REDIS_URL, workers=cfg)
    else:
        settings = make_settings(home, "sqlite", workers=cfg)
    store = open_store(settings)
    return Rig(settings, store, settings_env(settings, cfg), Scheduler(store, build_app(settings)))


@pytest.fixture(params=["embedded", pytest.param("redis", marks=[pytest.mark.redis, pytest.mark.postgres])])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rig_factory(tmp_path: Path, kind: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []
    pg = request.getfixturevalue("pg_url") if kind == "redis" else None

    def make(**workers: Any) -> Rig:
        rig = make_rig(tmp_path, kind, pg, **workers)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


def test_study_sent_twice_runs_once(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    study_id, _ = double.make_study(rig.store, seed=1, rle=True)
    assert len(rig.sched.scan()) == 1
    rig.start_worker()
    rig.wait(lambda: rig.settled(1)() and "handoff_at" in rig.jobs()[0].flags, what="the job and its hand-off")
    double.mark_ready(rig.store, study_id)  # the same study becomes ready again (sent twice)
    assert rig.sched.scan() == []
    [job] = rig.jobs()
    assert job.state == "done", job.error
    assert rig.results(job.id) == 1
    assert set(job.stages) >= {"load_ms", "decode_ms", "inference_ms", "store_ms", "queue_wait_ms"}
    result = read_result(rig.store, job.id)
    assert result is not None and result.case_id == job.id and "qsm_absent" in result.flags
    with rig.store.db.session() as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.kind == "decrypt.inference",
                                                       AuditEvent.subject == f"job:{job.id}")).all()
        assert len(events) == 2  # the FLAIR series and the EHR snapshot
        assert audit.verify(session).ok
    assert "handoff_at" in job.flags and len(job.flags["flair_instances"]) == 8
    assert job.flags["flair_frames"] == [None] * 8  # single-frame slices
    assert rig.publish_depth() == 1  # handed to msgate.publish (the results side consumes it)


def test_changed_series_set_supersedes(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    study_id, study_uid = double.make_study(rig.store, seed=2)
    rig.start_worker()
    assert len(rig.sched.scan()) == 1
    rig.wait(rig.settled(1), what="the first job")
    double.add_series(rig.store, study_uid=study_uid, role="T1", mrn="MRN00002", accession="ACC00002", seed=3)
    double.mark_ready(rig.store, study_id)
    [new_id] = rig.sched.scan()
    rig.wait(lambda: any(j.id == new_id and j.state == "done" for j in rig.jobs()), what="the second job")
    old, new = rig.jobs()
    assert (old.state, new.state) == ("superseded", "done")
    assert new.supersedes_id == old.id and set(new.flags["series"]) == {"FLAIR", "T1"}
    assert rig.results(new.id) == 1


def test_corrupt_series_fails_only_its_job(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(batch_size=4, batch_wait_seconds=0.5)
    good, _ = double.make_study(rig.store, seed=4)
    bad, _ = double.make_study(rig.store, seed=5, roles=("FLAIR", "QSM"), corrupt_role="QSM")
    assert len(rig.sched.scan()) == 2
    rig.start_worker()
    rig.wait(rig.settled(2), what="both jobs")
    by_study = {j.study_id: j for j in rig.jobs()}
    assert by_study[good].state == "done"
    assert by_study[bad].state == "failed"
    assert "series QSM" in (by_study[bad].error or "") and "pixel data" in (by_study[bad].error or "")
    assert rig.results(by_study[bad].id) == 0


def test_missing_ehr_runs_after_deadline_flagged(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(required_ehr_fields=["nfl"], ehr_deadline_seconds=3)
    double.add_patient(rig.store, mrn="MRN00006")
    study_id, _ = double.make_study(rig.store, seed=6)
    assert rig.sched.scan() == []  # waits for the HL7 feed
    rig.start_worker()
    time.sleep(3.2)
    [job_id] = rig.sched.scan()
    rig.wait(rig.settled(1), what="the flagged job")
    [job] = rig.jobs()
    assert job.state == "done" and job.flags["required_missing"] == ["nfl"]
    result = read_result(rig.store, job_id)
    assert result is not None and {"ehr_missing:nfl", "ehr_deadline"} <= set(result.flags)
    # the value arrives later: a correction supersedes the flagged result
    double.add_patient(rig.store, mrn="MRN00006", nfl=12.5)
    [fixed] = rig.sched.scan()
    rig.wait(lambda: any(j.id == fixed and j.state == "done" for j in rig.jobs()), what="the correction")
    result = read_result(rig.store, fixed)
    assert result is not None and "ehr_missing:nfl" not in result.flags and "ehr_deadline" not in result.flags


@pytest.mark.slow
def test_sigkill_mid_inference_reruns_once(rig_factory: Callable[..., Rig], tmp_path: Path) -> None:
    rig = rig_factory(hard_time_limit=4, soft_time_limit=3, visibility_timeout=6, lease_margin_seconds=2)
    mark = tmp_path / "predict.log"
    double.make_study(rig.store, seed=7)
    [job_id] = rig.sched.scan()
    first = rig.start_worker(MSGATE_TEST_PREDICT_SLEEP="30", MSGATE_TEST_PREDICT_MARK=str(mark))
    rig.wait(lambda: mark.exists() and job_id in mark.read_text(), what="inference to start")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert rig.jobs()[0].state == "running"
    rig.start_worker(MSGATE_TEST_PREDICT_MARK=str(mark))

    def reconciled_done() -> bool:
        rig.sched.reconcile()  # the scheduler role does this every scan_seconds
        return rig.jobs()[0].state == "done"

    rig.wait(reconciled_done, timeout=60, what="the re-run after SIGKILL")
    [job] = rig.jobs()
    assert job.attempts >= 2 and rig.results(job.id) == 1
    assert len(mark.read_text().splitlines()) >= 2


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
def test_broker_down_then_reconciler_runs_every_case(tmp_path: Path, pg_url: str) -> None:
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--daemonize", "no",
           "--bind", "127.0.0.1"]
    redis = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _wait_port(port)
    rig = make_rig(tmp_path, "redis", pg_url, broker=f"redis://127.0.0.1:{port}/0")
    try:
        redis.terminate()
        redis.wait(timeout=10)
        studies = [double.make_study(rig.store, seed=20 + i)[0] for i in range(3)]
        created = rig.sched.scan()  # commits the jobs; publishing fails while the broker is down
        assert len(created) == 3 and all(j.published_at is None for j in rig.jobs())
        redis = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        _wait_port(port)
        rig.start_worker()

        def reconciled() -> bool:
            rig.sched.reconcile()
            return rig.settled(3)()

        rig.wait(reconciled, timeout=90, what="every case after the broker came back")
        assert sorted(j.study_id for j in rig.jobs()) == sorted(studies)
        assert all(j.state == "done" and rig.results(j.id) == 1 for j in rig.jobs())
    finally:
        rig.close()
        redis.terminate()
        redis.wait(timeout=10)


def _wait_port(port: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"port {port} did not open")


def test_scheduler_role_turns_ready_studies_into_results(tmp_path: Path) -> None:
    """``run(store, stop)`` as ``msgate serve`` calls it: the hook wakes it, the reconciler runs in it."""
    import threading

    from msgate.workers import scheduler

    rig = make_rig(tmp_path, "embedded", None, scan_seconds=120)  # only the hook can wake it in time
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(rig.store, stop), daemon=True)
    try:
        thread.start()
        rig.start_worker()
        time.sleep(1.0)  # the role's first scan has run (nothing ready yet); it now waits for a wake-up
        study_id, _ = double.make_study(rig.store, seed=30)
        scheduler.hook(type("Ready", (), {"study_id": study_id})())
        woken = time.monotonic()
        rig.wait(lambda: bool(rig.jobs()), timeout=20, what="the job the hook's wake-up planned")
        assert time.monotonic() - woken < 20  # the scan period is 120 s
        rig.wait(rig.settled(1), what="the scheduler role's job")
        assert rig.jobs()[0].state == "done"
    finally:
        stop.set()
        thread.join(timeout=10)
        rig.close()


@pytest.mark.slow
def test_real_tiny_model_end_to_end(rig_factory: Callable[..., Rig]) -> None:
    """The real ``msgate.model.predict`` (tiny preset) behind the same queue: one result, rendered fields."""
    rig = rig_factory(model_module="msgate.model.predict", hard_time_limit=300, soft_time_limit=240,
                      visibility_timeout=400)
    double.add_patient(rig.store, mrn="MRN00040", nfl=10.0)
    # FLAIR + T1: the model's heuristic rim score overflows on random QSM noise (reported to the model owner)
    double.make_study(rig.store, seed=40, roles=("FLAIR", "T1"), slices=24, size=64, rle=True)
    [job_id] = rig.sched.scan()
    rig.start_worker()
    rig.wait(rig.settled(1), timeout=240, what="the real model's job")
    [job] = rig.jobs()
    assert job.state == "done", job.error
    result = read_result(rig.store, job_id)
    assert result is not None and len(result.edss_probabilities) == 4 and 0.0 <= result.p_ms <= 1.0
    assert result.model_version == job.model_version and rig.results(job_id) == 1
