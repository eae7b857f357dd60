"""Job bookkeeping without a worker: idempotency keys, supersession, leases, EHR waiting, the jobs CLI.

Embedded SQLite store; the broker is the embedded SQLite transport (a file, no sockets)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from sqlmodel import select
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

import test_workers_double as double  # noqa: E402
from conftest import make_settings  # noqa: E402

from msgate.cli import jobs_cmd  # noqa: E402
from msgate.storage.models import Job  # noqa: E402
from msgate.storage.store import Store, open_store  # noqa: E402
from msgate.workers import jobs  # noqa: E402
from msgate.workers.celery_app import build_app  # noqa: E402
from msgate.workers.scheduler import Scheduler, hook  # noqa: E402

WORKERS = {"model_module": "test_workers_double", "ehr_deadline_seconds": 0, "required_ehr_fields": [],
           "hard_time_limit": 2, "soft_time_limit": 1, "visibility_timeout": 3}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    st = open_store(make_settings(tmp_path / "home", "sqlite", workers=WORKERS))
    yield st  # type: ignore[misc]
    st.close()


@pytest.fixture
def sched(store: Store) -> Scheduler:
    return Scheduler(store, build_app(store.settings))


def _jobs(store: Store) -> list[Job]:
    with store.db.session() as session:
        return list(session.exec(select(Job).order_by(Job.created_at)).all())  # type: ignore[arg-type]


def test_key_is_stable_and_changes_with_content(store: Store, sched: Scheduler) -> None:
    study_id, uid = double.make_study(store, seed=1)
    [first] = sched.scan()
    double.mark_ready(store, study_id)
    assert sched.scan() == []
    double.add_patient(store, mrn="MRN00001", nfl=9.0)  # an HL7 value arrives: the EHR hash changes
    [second] = sched.scan()
    old, new = _jobs(store)
    assert (old.id, new.id) == (first, second) and old.state == "superseded" and new.supersedes_id == first
    assert old.idem_key != new.idem_key and all(j.published_at is not None for j in (old, new))


def test_required_field_waits_until_the_deadline(tmp_path: Path) -> None:
    st = open_store(make_settings(tmp_path / "h2", "sqlite",
                                  workers={**WORKERS, "required_ehr_fields": ["nfl"], "ehr_deadline_seconds": 1}))
    try:
        sched = Scheduler(st, build_app(st.settings))
        double.make_study(st, seed=2)
        assert sched.scan() == []
        time.sleep(1.1)
        [job_id] = sched.scan()
        [job] = _jobs(st)
        assert job.flags["required_missing"] == ["nfl"] and "ehr_deadline" in job.flags["result_flags"]
    finally:
        st.close()


def test_claims_and_leases(store: Store, sched: Scheduler) -> None:
    double.make_study(store, seed=3)
    [job_id] = sched.scan()
    db = store.db
    assert jobs.claim(db, job_id, owner="a:1", lease_seconds=60, via="message", task_id="t1") is not None
    assert jobs.claim(db, job_id, owner="b:2", lease_seconds=60, via="batch") is None
    assert jobs.claim(db, job_id, owner="b:2", lease_seconds=60, via="message", task_id="t2") is None
    # the same message delivered again means its first holder died: take over
    assert jobs.claim(db, job_id, owner="b:2", lease_seconds=60, via="message", task_id="t1") is not None
    assert not jobs.finish(db, job_id, owner="a:1", state="done", stages={})  # the old owner lost it
    with db.session() as session:
        row = session.get(Job, job_id)
        assert row is not None
        row.flags = {**row.flags, "lease_until": time.time() - 1}
        session.add(row)
    assert jobs.expire_leases(db) == [job_id]
    [job] = _jobs(store)
    assert job.state == "queued" and job.published_at is None and "lease expired" in (job.error or "")
    # both ways of losing a worker are counted: the redelivered message's take-over was not (a case that
    # killed its worker three times showed "lost": 2 when one crash was noticed by the redelivery)
    assert job.flags["lost"] == 2


def test_a_job_no_worker_can_run_fails_after_its_hand_backs(store: Store, sched: Scheduler) -> None:
    """A checkpoint rolled back under a queued job (or a version skew nobody noticed): every worker hands it
    back; it bounced forever, never failing, invisible in `jobs` and `status`."""
    double.make_study(store, seed=4)
    [job_id] = sched.scan()
    for n in range(1, 4):
        assert jobs.claim(store.db, job_id, owner="w:1", lease_seconds=60, via="message", task_id=f"t{n}")
        assert jobs.hand_back(store.db, job_id, owner="w:1", error="model version mismatch", max_handbacks=3)
        [job] = _jobs(store)
        assert job.attempts == 0 and job.flags["handbacks"] == n
        assert job.state == ("queued" if n < 3 else "failed")
    assert "after 3 hand-backs" in (job.error or "")


def test_hook_wakes_the_scheduler() -> None:
    from msgate.listener import server
    from msgate.workers import scheduler

    assert hook in server._READY_HOOKS  # serve --role all: the in-process listener wakes the scheduler
    scheduler._drain(0.0)  # wake-ups left by listeners that earlier tests ran in this process
    hook(type("Ready", (), {"study_id": 42})())
    assert scheduler._drain(0.1) == {42}


def test_jobs_cli(store: Store, sched: Scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    double.make_study(store, seed=4)
    [job_id] = sched.scan()
    monkeypatch.setenv("MSGATE_HOME", str(store.settings.home))
    monkeypatch.setenv("MSGATE_STORAGE__MIN_FREE_BYTES", "0")
    runner = CliRunner()
    out = runner.invoke(jobs_cmd.app, ["list", "--json"])
    assert out.exit_code == 0, out.output
    assert [d["id"] for d in json.loads(out.output)] == [job_id]
    out = runner.invoke(jobs_cmd.app, ["retry", job_id])
    assert out.exit_code == 1 and "only failed or cancelled" in out.output
    out = runner.invoke(jobs_cmd.app, ["cancel", job_id[:10], "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["state"] == "cancelled"
    out = runner.invoke(jobs_cmd.app, ["retry", job_id, "--json"])
    assert out.exit_code == 0 and json.loads(out.output) == {"id": job_id, "state": "queued", "published": True}
    out = runner.invoke(jobs_cmd.app, ["show", job_id, "--json"])
    doc = json.loads(out.output)
    assert doc["state"] == "queued" and doc["result"] is False and doc["series"] == {"FLAIR": 1}
    out = runner.invoke(jobs_cmd.app, ["show", job_id])
    assert out.exit_code == 0 and "queued" in out.output


def test_worker_without_model_does_not_hold_the_job(store: Store, sched: Scheduler, tmp_path: Path) -> None:
    from msgate.errors import Transient
    from msgate.workers import inference, runtime

    double.make_study(store, seed=5)
    [job_id] = sched.scan()
    broken = store.settings.model_copy(update={"workers": store.settings.workers.model_copy(
        update={"model_module": "msgate_no_such_model"})})
    with pytest.raises(Transient, match="model unavailable"):
        inference.run(runtime.Runtime(broken, store), job_id, task_id="t", handoff=lambda _: None)
    [job] = _jobs(store)
    assert job.state == "queued" and job.attempts == 0


def test_inference_run_is_idempotent(store: Store, sched: Scheduler) -> None:
    from msgate.workers import inference, runtime
    from msgate.workers.results_io import read_result

    double.make_study(store, seed=6)
    [job_id] = sched.scan()
    handed: list[str] = []
    rt = runtime.Runtime(store.settings, store)
    assert inference.run(rt, job_id, task_id="t", handoff=handed.append) == "batch of 1"
    assert inference.run(rt, job_id, task_id="t", handoff=handed.append) == "skipped (done)"
    [job] = _jobs(store)
    assert job.state == "done" and handed == [job_id] and read_result(store, job_id) is not None


def test_a_study_ready_during_a_scheduler_outage_still_gets_its_job(store: Store) -> None:
    """Ready two hours ago, past the lookback window (the scheduler was down or had no model): a
    restarted scheduler still plans it, once."""
    from datetime import timedelta

    from msgate.storage.models import Study, utcnow

    study_id, _ = double.make_study(store, seed=11)
    with store.db.session() as session:
        study = session.get(Study, study_id)
        assert study is not None
        study.ready_at = utcnow() - timedelta(hours=2)
        session.add(study)
    restarted = Scheduler(store, build_app(store.settings))
    assert len(restarted.scan()) == 1 and restarted.scan() == []
    assert [j.study_id for j in _jobs(store)] == [study_id]


def test_a_demographics_correction_plans_the_case_again(store: Store, sched: Scheduler) -> None:
    """ADT^A08 corrects sex and birth date: the EHR snapshot changes, so the case runs again (the new
    result goes out as a correction). Only observations and orders used to count as changes."""
    from msgate.storage import repo_ehr

    double.make_study(store, seed=14)
    double.add_patient(store, mrn="MRN00014", sex="F", birth="19800101")
    [first] = sched.scan()
    with store.db.session() as session:
        repo_ehr.upsert_patient(session, store.cipher, [repo_ehr.Identifier("MRN00014")], birth_date="19500101",
                                sex="M", update_demographics=True)
    [second] = sched.scan()
    assert [(j.id, j.state) for j in _jobs(store)] == [(first, "superseded"), (second, "queued")]


def test_an_unforeseen_error_fails_its_job_alone(store: Store, sched: Scheduler,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A FLAIR series whose InstanceNumber is not a number (ValueError while the volume is built) used
    to escape ``inference.run``: that job and the healthy one batched with it stayed running until
    their lease ran out, then were re-queued to fail the same way, without end."""
    from msgate.workers import inference, runtime

    double.make_study(store, seed=21)
    [healthy] = sched.scan()
    real = double.mr_slice

    def bad_instance_number(**kw: object) -> bytes:
        data = real(**kw)  # type: ignore[arg-type]
        number = str(int(kw["index"]) + 1).ljust(2).encode()  # type: ignore[call-overload]
        return data.replace(b"\x20\x00\x13\x00IS\x02\x00" + number, b"\x20\x00\x13\x00IS\x02\x00ab")

    monkeypatch.setattr(double, "mr_slice", bad_instance_number)
    double.make_study(store, seed=22)
    monkeypatch.setattr(double, "mr_slice", real)
    [poison] = sched.scan()
    rt = runtime.Runtime(store.settings, store)
    assert inference.run(rt, poison, task_id="t-poison", handoff=lambda _: None) == "batch of 2"
    bad, good = jobs.state_of(store.db, poison), jobs.state_of(store.db, healthy)
    assert bad is not None and good is not None
    assert (bad.state, good.state) == ("failed", "done")
    assert "could not be loaded (ValueError" in (bad.error or "")


def test_a_job_that_keeps_losing_its_worker_fails_at_the_retry_limit(store: Store, sched: Scheduler) -> None:
    """A job that kills its worker each time (out of memory, a driver crash) used to be re-queued
    forever, taking a GPU worker down once per lease."""
    double.make_study(store, seed=12)
    [job_id] = sched.scan()
    limit = store.settings.workers.max_retries + 1
    for attempt in range(1, limit + 1):
        assert jobs.claim(store.db, job_id, owner=f"w:{attempt}", lease_seconds=60, via="message",
                          task_id=f"t{attempt}") is not None
        with store.db.session() as session:
            row = session.get(Job, job_id)
            assert row is not None
            row.flags = {**row.flags, "lease_until": time.time() - 1}
            session.add(row)
        assert jobs.expire_leases(store.db, max_attempts=limit) == [job_id]
        job = jobs.state_of(store.db, job_id)
        assert job is not None and job.state == ("failed" if attempt == limit else "queued"), (attempt, job.state)
    assert f"failed after {limit} attempts" in (job.error or "")


def test_an_unforeseen_error_after_loading_requeues_the_batch(store: Store, sched: Scheduler,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Past loading (here: storing the result), an unforeseen error re-queues every job of the batch at
    once instead of leaving them running until their leases end."""
    from msgate.workers import inference, runtime

    double.make_study(store, seed=23)
    double.make_study(store, seed=24)
    first, second = sched.scan()

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("disk controller reset")

    monkeypatch.setattr(inference, "store_result", broken)
    with pytest.raises(RuntimeError):
        inference.run(runtime.Runtime(store.settings, store), first, task_id="t-1", handoff=lambda _: None)
    states = [(j.state, j.error) for j in (jobs.state_of(store.db, first), jobs.state_of(store.db, second)) if j]
    assert states == [("queued", "unexpected error (RuntimeError)")] * 2


def test_retry_gets_a_full_budget_and_never_revives_a_stale_job(store: Store, sched: Scheduler,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A retried job kept its attempt count (one transient error failed it again at once), and retrying a
    cancelled job after a newer one existed delivered the stale result last."""
    double.make_study(store, seed=5)
    [job_id] = sched.scan()
    with store.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state, job.attempts, job.error = "failed", 6, "failed after 6 attempts"
        job.flags = {**job.flags, "publish_error": "no_result", "handoffs": 3}
    monkeypatch.setenv("MSGATE_HOME", str(store.settings.home))
    monkeypatch.setenv("MSGATE_STORAGE__MIN_FREE_BYTES", "0")
    runner = CliRunner()
    assert runner.invoke(jobs_cmd.app, ["retry", job_id]).exit_code == 0
    job = _jobs(store)[0]
    assert (job.state, job.attempts, job.error) == ("queued", 0, None)
    assert "publish_error" not in job.flags and "handoffs" not in job.flags
    assert runner.invoke(jobs_cmd.app, ["cancel", job_id]).exit_code == 0
    newer = jobs.create(store.db, study_id=job.study_id, idem_key="newer", model_version="m", flags={})
    assert newer is not None and newer.supersedes_id == job_id  # linked although the older one was cancelled
    refused = runner.invoke(jobs_cmd.app, ["retry", job_id])
    assert refused.exit_code == 1 and newer.id in refused.output and "newer job" in refused.output


def test_a_released_job_waits_for_its_own_retry_before_the_reconciler_resends_it(store: Store,
                                                                                  sched: Scheduler) -> None:
    """The reconciler re-sent a released job at once (its grace counted from created_at), beside the
    message's own retry with backoff: six attempts went in four seconds and a 20 s outage failed the job."""
    from datetime import datetime, timedelta

    double.make_study(store, seed=7)
    [job_id] = sched.scan()
    with store.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.created_at = job.created_at - timedelta(minutes=5)
        job.published_at = job.created_at
    claim = jobs.claim(store.db, job_id, owner="w1", lease_seconds=60, via="test")
    assert claim is not None
    assert jobs.release(store.db, job_id, owner="w1", error="transient: key service", max_attempts=6)
    assert jobs.unpublished(store.db, older_than=0, backoff_max=300) == []  # its retry is due in ~2 s
    with store.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        released = datetime.fromisoformat(job.flags["released_at"])
        job.flags = {**job.flags, "released_at": (released - timedelta(seconds=10)).isoformat()}
    assert jobs.unpublished(store.db, older_than=0, backoff_max=300) == [job_id]  # the retry looks lost


def test_a_reverted_demographics_correction_runs_the_case_again(store: Store, sched: Scheduler) -> None:
    """A wrong ADT^A08 (job2 supersedes job1), then an A08 that puts the original values back: the snapshot
    equals job1's again. The key was found on the superseded job1 and nothing ran, so the result computed from
    the wrong demographics stayed current in the EHR and the PACS."""
    from msgate.storage import repo_ehr

    double.make_study(store, seed=15)
    double.add_patient(store, mrn="MRN00015", sex="F", birth="19800101")
    [first] = sched.scan()
    for birth, sex in (("19500101", "M"), ("19800101", "F")):
        with store.db.session() as session:
            repo_ehr.upsert_patient(session, store.cipher, [repo_ehr.Identifier("MRN00015")], birth_date=birth,
                                    sex=sex, update_demographics=True)
        [created] = sched.scan()
    second, third = [j for j in _jobs(store) if j.id != first]
    assert created == third.id and third.supersedes_id == second.id and second.supersedes_id == first
    assert [j.state for j in _jobs(store)] == ["superseded", "superseded", "queued"]
    assert third.content_key == _jobs(store)[0].content_key != second.content_key
    assert sched.scan() == []  # the same content as the newest job: nothing


def test_a_withdrawn_lab_value_runs_the_case_again(store: Store, sched: Scheduler) -> None:
    """A lab value posted to the wrong patient (job2), then withdrawn (OBX-11 W): the case runs again
    without it, superseding the job that used it."""
    from msgate.storage.models import Observation, utcnow

    double.make_study(store, seed=16)
    double.add_patient(store, mrn="MRN00016")
    [first] = sched.scan()
    double.add_patient(store, mrn="MRN00016", nfl=42.0)
    [second] = sched.scan()
    with store.db.session() as session:
        [obs] = session.exec(select(Observation)).all()
        obs.withdrawn, obs.status, obs.updated_at = True, "W", utcnow()
        session.add(obs)
    [third] = sched.scan()
    rows = {j.id: j for j in _jobs(store)}
    assert rows[third].supersedes_id == second and rows[second].state == "superseded"
    assert rows[first].state == "superseded" and rows[third].state == "queued"
    assert rows[third].flags["ehr_missing"] == rows[first].flags["ehr_missing"] and "nfl" in rows[third].flags[
        "ehr_missing"]


def test_a_study_made_ready_again_without_change_is_planned_once(store: Store, sched: Scheduler,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A PACS re-sends the same study (ready again after its job was created, the same key): it was planned
    again on every scan (a decrypted EHR snapshot and a series hash each time) for the whole window."""
    from msgate.workers import scheduler as scheduler_mod

    study_id, _ = double.make_study(store, seed=17)
    [first] = sched.scan()
    calls: list[int] = []
    real = scheduler_mod.plan

    def counting(session: object, st: object, study: object, **kw: object) -> object:
        calls.append(study.id)  # type: ignore[attr-defined]
        return real(session, st, study, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(scheduler_mod, "plan", counting)
    double.mark_ready(store, study_id)
    for _ in range(5):
        assert sched.scan() == []
    assert calls == [study_id]
    [job] = _jobs(store)
    assert job.id == first and job.state == "queued"
    double.mark_ready(store, study_id)  # ready once more (another re-send): planned once more
    for _ in range(3):
        assert sched.scan() == []
    assert calls == [study_id, study_id]
