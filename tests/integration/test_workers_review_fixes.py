"""Review fixes of the job pipeline, with a real Celery worker (``msgate serve --role worker`` in a
subprocess, never eager) on the embedded SQLite transport and on Redis + PostgreSQL.

- one case that kills its worker (out of memory, a CUDA abort) or hangs it past the hard time limit
  fails alone; the cases it was batched with are run again alone and finish;
- a worker whose model version is not the job's hands the job back (no attempt counted) and a worker
  with the job's version runs it; the scheduler re-reads the model version on every scan.

This module is also the model (``workers.model_module = "test_workers_review_fixes"``): the test double
of ``test_workers_double``, plus a poison case (a 24x24 FLAIR) that kills its process
(``MSGATE_TEST_POISON=kill``) or sleeps (``sleep:<seconds>``), and a version read from the file named by
``MSGATE_TEST_VERSION_FILE`` (a replaced checkpoint) or from ``MSGATE_TEST_MODEL_VERSION``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import test_workers_double as double
from conftest import make_settings
from test_workers_queue import Rig, make_rig

from msgate.model.types import Case, ModelResult
from msgate.storage.store import Store, open_store
from msgate.workers import jobs
from msgate.workers.celery_app import build_app
from msgate.workers.results_io import read_result
from msgate.workers.scheduler import Scheduler
from msgate.workers.tasks import HARD_LIMIT_EXIT

HERE = Path(__file__).resolve().parent
REDIS_OWN_DB = "redis://127.0.0.1:6379/8"  # this file's own (conftest gives xdist workers 15, 14, ...)
POISON_SIZE = 24
_LOADED: dict[str, str] = {}


def model_version() -> str:
    path = os.environ.get("MSGATE_TEST_VERSION_FILE")
    if path and Path(path).is_file():
        return Path(path).read_text().strip()
    return os.environ.get("MSGATE_TEST_MODEL_VERSION", double.MODEL_VERSION)


def load_model(device: str = "cpu") -> None:
    _LOADED["version"] = model_version()


def predict(cases: Sequence[Case]) -> list[ModelResult]:
    poison = os.environ.get("MSGATE_TEST_POISON", "")
    if poison and any(c.flair.data.shape[-1] == POISON_SIZE for c in cases):
        log = os.environ.get("MSGATE_TEST_POISON_LOG")
        if log:
            with open(log, "a") as handle:
                handle.write(f"{len(cases)}\n")
        if poison == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(float(poison.removeprefix("sleep:")))
    version = _LOADED.get("version", model_version())
    return [dataclasses.replace(r, model_version=version) for r in double.predict(cases)]


pytestmark = [pytest.mark.integration]

POISON_RIG = {"model_module": "test_workers_review_fixes", "hard_time_limit": 3, "soft_time_limit": 2,
              "visibility_timeout": 5, "lease_margin_seconds": 1, "max_retries": 2, "batch_size": 4,
              "batch_wait_seconds": 0.5}


@pytest.fixture(params=["embedded", pytest.param("redis", marks=[pytest.mark.redis, pytest.mark.postgres])])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rig_factory(tmp_path: Path, kind: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []
    pg = request.getfixturevalue("pg_url") if kind == "redis" else None

    def make(**workers: Any) -> Rig:
        rig = make_rig(tmp_path, kind, pg, broker=REDIS_OWN_DB, **workers)
        # the worker imports this module as its model, and it imports the tests' conftest
        rig.env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), rig.env["PYTHONPATH"]])
        rig.env["MSGATE_METRICS__ENABLED"] = "false"  # restarted workers must not race for the metrics port
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


def _supervise(rig: Rig, env: dict[str, str], exits_expected: int, timeout: float = 150) -> list[int]:
    """What the scheduler role and the service supervisor do: reconcile every pass, restart a worker
    that exited; until every job settled and ``exits_expected`` workers exited (the watchdog ends its
    process just after it released the jobs). Returns the exit status of each worker that exited."""
    worker, exits = rig.start_worker(**env), []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rig.sched.reconcile()
        if worker.poll() is not None:
            exits.append(worker.returncode)
            worker = rig.start_worker(**env)
        if rig.settled(3)() and len(exits) >= exits_expected:
            return exits
        time.sleep(0.3)
    rig.wait(rig.settled(3), timeout=0, what="every job to settle")
    return exits


def _poison_and_two_good(rig: Rig) -> tuple[int, list[int]]:
    poison, _ = double.make_study(rig.store, seed=1, size=POISON_SIZE)
    good = [double.make_study(rig.store, seed=10 + i)[0] for i in range(2)]
    assert len(rig.sched.scan()) == 3  # queued together before any worker runs: they would be batched
    return poison, good


@pytest.mark.slow
def test_a_case_that_kills_its_worker_fails_alone(rig_factory: Callable[..., Rig], tmp_path: Path) -> None:
    """Every crash of the poison case used to count an attempt against the whole batch, which was
    re-queued and batched again, until all of its jobs failed as 'worker lost'."""
    rig = rig_factory(**POISON_RIG)
    poison, good = _poison_and_two_good(rig)
    log = tmp_path / "poison.log"
    exits = _supervise(rig, {"MSGATE_TEST_POISON": "kill", "MSGATE_TEST_POISON_LOG": str(log)}, 3)
    by_study = {j.study_id: j for j in rig.jobs()}
    for sid in good:
        assert by_study[sid].state == "done", by_study[sid].error
        assert rig.results(by_study[sid].id) == 1
    bad = by_study[poison]
    assert bad.state == "failed" and "worker lost" in (bad.error or "") and bad.attempts == 3
    assert bad.flags.get("lost") == 3 and rig.results(bad.id) == 0
    assert exits == [-signal.SIGKILL] * 3
    assert [int(n) for n in log.read_text().split()] == [3, 1, 1]  # after the first crash it runs alone


@pytest.mark.slow
def test_a_case_past_the_hard_limit_is_ended_and_fails_alone(rig_factory: Callable[..., Rig],
                                                            tmp_path: Path) -> None:
    """The solo pool never applied Celery's time limits: a case slower than the hard limit ran on while
    its lease ran out; the reconciler re-queued it and its batch mates, and the finished results were
    refused, until every job of the batch failed as 'worker lost'."""
    rig = rig_factory(**POISON_RIG)
    poison, good = _poison_and_two_good(rig)
    log = tmp_path / "poison.log"
    exits = _supervise(rig, {"MSGATE_TEST_POISON": "sleep:30", "MSGATE_TEST_POISON_LOG": str(log)}, 3)
    by_study = {j.study_id: j for j in rig.jobs()}
    for sid in good:
        assert by_study[sid].state == "done", by_study[sid].error
        assert rig.results(by_study[sid].id) == 1
    bad = by_study[poison]
    assert bad.state == "failed" and "exceeded the hard time limit of 3 s" in (bad.error or ""), bad.error
    assert bad.attempts == 3 and exits == [HARD_LIMIT_EXIT] * 3  # the watchdog ended the worker each time
    assert [int(n) for n in log.read_text().split()] == [3, 1, 1]
    text = "\n".join(p.read_text(errors="replace") for p in rig.logs)
    assert "exceeded the hard time limit" in text


def test_a_job_for_another_model_version_is_handed_back(rig_factory: Callable[..., Rig]) -> None:
    """A worker with another checkpoint (a rolling upgrade) used to run the job silently, under the
    version the job was not planned (and keyed) with."""
    rig = rig_factory(model_module="test_workers_review_fixes")
    double.make_study(rig.store, seed=3)
    [job_id] = rig.sched.scan()
    assert rig.jobs()[0].model_version == "double-1"
    other = rig.start_worker(MSGATE_TEST_MODEL_VERSION="double-2")

    def seen() -> bool:  # the worker claims (running) before it reads the version: wait past that
        job = rig.jobs()[0]
        return job.state not in ("queued", "running") or bool(job.flags.get("handbacks"))

    rig.wait(seen, what="the double-2 worker to take the message")
    [job] = rig.jobs()
    assert job.state == "queued", (job.state, job.error)
    assert job.attempts == 0 and "model version" in (job.error or "") and rig.results(job_id) == 0
    other.terminate()  # the upgrade is rolled back: a worker with the job's version replaces it
    other.wait(timeout=30)
    rig.start_worker(MSGATE_TEST_MODEL_VERSION="double-1")

    def reconciled_done() -> bool:
        rig.sched.reconcile()  # re-sends the handed-back job
        return rig.jobs()[0].state == "done"

    rig.wait(reconciled_done, timeout=90, what="a double-1 worker to run it")
    result = read_result(rig.store, job_id)
    assert result is not None and result.model_version == "double-1" == rig.jobs()[0].model_version


def _versioned_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Store]:
    """A store whose model version is read from a file (``double-1``; rewrite it to replace the checkpoint)."""
    version = tmp_path / "version.txt"
    version.write_text("double-1")
    monkeypatch.setenv("MSGATE_TEST_VERSION_FILE", str(version))
    workers = {"model_module": "test_workers_review_fixes", "ehr_deadline_seconds": 0,
               "required_ehr_fields": []}
    return version, open_store(make_settings(tmp_path / "home", "sqlite", workers=workers))


def test_the_scheduler_follows_a_replaced_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler read the model version once at start: after a checkpoint was replaced it kept
    planning (and keying) jobs with the old version. It now re-reads it on each scan, and a job still
    queued for the old version is planned again for the new one (the old job is superseded)."""
    version, store = _versioned_store(tmp_path, monkeypatch)
    try:
        sched = Scheduler(store, build_app(store.settings))
        double.make_study(store, seed=4)
        [old] = sched.scan()
        version.write_text("double-2")
        [new] = sched.scan()
        assert sched.model_version == "double-2"
        old_job, new_job = jobs.state_of(store.db, old), jobs.state_of(store.db, new)
        assert old_job is not None and new_job is not None
        assert (old_job.state, new_job.state, new_job.model_version) == ("superseded", "queued", "double-2")
        double.make_study(store, seed=5)
        [third] = sched.scan()
        third_job = jobs.state_of(store.db, third)
        assert third_job is not None and third_job.model_version == "double-2"
        assert sched.scan() == []  # nothing stale left: no job planned twice
    finally:
        store.close()


def test_two_schedulers_on_two_checkpoints_do_not_supersede_each_other_for_ever(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch
                                                                               ) -> None:
    """Each re-planned the other's queued job as planned for another version, and since only the newest job
    counts, each scan made one more job. A job another scheduler planned after this one took its version is
    left; a restart (or a replaced checkpoint) still takes the jobs queued before it."""
    version, store = _versioned_store(tmp_path, monkeypatch)
    try:
        double.make_study(store, seed=7)
        one = Scheduler(store, build_app(store.settings))
        [first] = one.scan()
        version.write_text("double-2")
        two = Scheduler(store, build_app(store.settings))  # started after the job: it takes it
        [second] = two.scan()
        version.write_text("double-1")
        one._stamp = None  # as if its checkpoint files were untouched: it keeps double-1
        made = [job for _ in range(3) for sched, v in ((one, "double-1"), (two, "double-2"))
                for job in (version.write_text(v), sched.scan())[1]]
        assert made == [], made
        states = {j: getattr(jobs.state_of(store.db, j), "state", None) for j in (first, second)}
        assert states == {first: "superseded", second: "queued"}
    finally:
        store.close()


def test_worker_runs_a_job_of_its_own_version_in_process(tmp_path: Path) -> None:
    """``inference.run`` itself: a job of another version is handed back unclaimed (attempts unchanged,
    published_at cleared so the reconciler re-sends it after a backoff) and never batched."""
    from msgate.workers import inference, runtime

    workers = {"model_module": "test_workers_review_fixes", "ehr_deadline_seconds": 0,
               "required_ehr_fields": [], "batch_wait_seconds": 0}
    store = open_store(make_settings(tmp_path / "home", "sqlite", workers=workers))
    try:
        double.make_study(store, seed=6)
        [job_id] = Scheduler(store, build_app(store.settings)).scan()
        with store.db.session() as session:
            from msgate.storage.models import Job

            row = session.get(Job, job_id)
            assert row is not None
            row.model_version = "double-0"
            session.add(row)
        rt = runtime.Runtime(store.settings, store)
        assert inference.run(rt, job_id, task_id=f"t-{uuid.uuid4().hex[:6]}", handoff=lambda _: None) \
            == "handed back (model version)"
        job = jobs.state_of(store.db, job_id)
        assert job is not None and (job.state, job.attempts, job.published_at) == ("queued", 0, None)
        assert job.flags.get("handbacks") == 1 and "owner" not in job.flags
        assert jobs.unpublished(store.db, older_than=0) == []  # waits for a backoff, no hot loop
    finally:
        store.close()
