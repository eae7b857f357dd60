"""A done job whose publish task was lost (a broker restarted without persistence) or gave up on its
retries is handed to publishing again by the reconciler, a bounded number of times; a rendered job, or
one publishing refused for good, is left alone."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import test_workers_double as double
from conftest import make_settings

from msgate.storage.models import Job, utcnow
from msgate.storage.store import open_store
from msgate.workers import jobs, scheduler
from msgate.workers.celery_app import build_app
from msgate.workers.scheduler import Scheduler

pytestmark = [pytest.mark.integration]


def test_a_job_never_rendered_is_handed_off_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path / "home", "sqlite", workers={"publish_stall_seconds": 600,
                                                                   "publish_handoffs": 3})
    store = open_store(settings)
    sent: list[str] = []
    monkeypatch.setattr(scheduler.tasks, "send_publish", lambda app, job_id: sent.append(job_id))
    try:
        study_id, _ = double.make_study(store, seed=4)
        old = utcnow() - timedelta(hours=2)
        flags = {"handoff_at": old.isoformat()}
        with store.db.session() as session:
            for name, extra in (("lost", {}), ("rendered", {"rendered_at": old.isoformat()}),
                                ("refused", {"publish_error": "no_flair"}), ("recent", {})):
                session.add(Job(id=name, study_id=study_id, idem_key=name, state="done", finished_at=old,
                                flags={**flags, **extra}))
            recent = session.get(Job, "recent")
            assert recent is not None
            recent.flags = {"handoff_at": utcnow().isoformat()}
        sched = Scheduler(store, build_app(settings))
        sched.reconcile()
        assert sent == ["lost"]
        sched.reconcile()
        assert sent == ["lost"]  # handed off again just now: waits another publish_stall_seconds
        for handoffs in (2, 3):
            with store.db.session() as session:
                job = session.get(Job, "lost")
                assert job is not None and job.flags["handoffs"] == handoffs
                job.flags = {**job.flags, "handoff_at": old.isoformat()}
            sched.reconcile()
        assert sent == ["lost", "lost"]  # publish_handoffs = 3 in all, the first included
        assert jobs.stalled_publish(store.db, older_than=600, max_handoffs=3) == []
    finally:
        store.close()


def test_hand_offs_are_claimed_once_and_never_starved(tmp_path: Path) -> None:
    """Two schedulers (HA) both handed off the same jobs (read, send, then mark); and 1000 jobs that can
    never be published, at the head of a fixed window, hid a job the sweep was for."""
    settings = make_settings(tmp_path / "home", "sqlite", workers={"publish_stall_seconds": 600})
    store = open_store(settings)
    try:
        study_id, _ = double.make_study(store, seed=6)
        old = utcnow() - timedelta(hours=2)
        with store.db.session() as session:
            session.add_all([Job(id=f"refused{i}", study_id=study_id, idem_key=f"refused{i}", state="done",
                                 finished_at=old + timedelta(seconds=i),
                                 flags={"handoff_at": old.isoformat(), "publish_error": "no_flair"})
                             for i in range(1000)])
            session.add(Job(id="lost", study_id=study_id, idem_key="lost", state="done",
                            finished_at=old - timedelta(minutes=5), flags={"handoff_at": old.isoformat()}))
            session.add(Job(id="fresh", study_id=study_id, idem_key="fresh", state="done",
                            finished_at=old - timedelta(minutes=6), flags={}))
        assert jobs.stalled_publish(store.db, older_than=600, max_handoffs=4) == ["lost"]
        assert jobs.not_handed_off(store.db, older_than=0) == ["fresh"]
        before = utcnow() - timedelta(seconds=600)
        assert [jobs.claim_handoff(store.db, "lost", again_before=before) for _ in range(2)] == [True, False]
        assert [jobs.claim_handoff(store.db, "fresh") for _ in range(2)] == [True, False]
    finally:
        store.close()
