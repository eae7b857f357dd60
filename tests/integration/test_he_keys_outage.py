"""HE mode with real roles: the keys role is away for longer than the RPC timeout while a job runs, then
comes back. The job must finish ``done``.

Review 2 #8: the worker's first request R1 stayed in ``msgate.he-keys``; the worker timed out
(``he_timeout``) and Celery retried the job, whose attempt 2 sent R2. When the keys role came back it
served R1 first, which used up attempt 2's single encryption, and refused R2 (the request the worker
waited on) ``he_replay``: the job failed for good. Now R1 is dropped unserved (past its deadline), and
would be refused ``he_stale`` if it were not. ``MSGATE_HE__RPC_TIMEOUT_SECONDS`` keeps the test short.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import test_workers_double as double
from conftest import make_settings
from sqlmodel import select
from test_workers_queue import FAST, Rig, settings_env

from msgate.model.he_keys import HeKeys
from msgate.model.he_service import AUDIT_KIND
from msgate.storage.models import AuditEvent
from msgate.storage.store import open_store
from msgate.workers.celery_app import build_app
from msgate.workers.results_io import read_result
from msgate.workers.scheduler import Scheduler

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TIMEOUT_S = 10  # the worker's wait for the key service, and each request's deadline


def test_a_job_survives_a_keys_role_away_longer_than_the_timeout(tmp_path: Path) -> None:
    cfg = {**FAST, "model_module": "msgate.model.predict", "hard_time_limit": 300, "soft_time_limit": 240,
           "visibility_timeout": 400, "max_retries": 8, "retry_backoff_max": 4}
    settings = make_settings(tmp_path / "home", "sqlite", workers=cfg,
                             he={"enabled": True, "rpc_timeout_seconds": TIMEOUT_S})
    store = open_store(settings)
    env = {**settings_env(settings, cfg), "MSGATE_HE__ENABLED": "true",
           "MSGATE_HE__RPC_TIMEOUT_SECONDS": str(TIMEOUT_S), "MSGATE_HE__CLOCK_SKEW_SECONDS": "0"}
    rig = Rig(settings, store, env, Scheduler(store, build_app(settings)))
    try:
        HeKeys(settings.home, store.ring).ensure(settings.he.params())  # the keys role ran once, then stopped
        double.add_patient(store, mrn="MRN00090", nfl=22.0, sex="F", birth="19750101")
        double.make_study(store, seed=90, roles=("FLAIR", "T1"), slices=24, size=64, rle=True, mrn="MRN00090")
        [job_id] = rig.sched.scan()
        rig.start_worker()

        def retried() -> bool:  # attempt 1 timed out waiting for the keys role; attempt 2 waits now
            [job] = rig.jobs()
            return job.attempts >= 2 and job.state == "running"

        rig.wait(retried, timeout=120, what="the job's second attempt")
        keys_log = tmp_path / "keys.log"
        rig.logs.append(keys_log)
        rig.procs.append(subprocess.Popen([sys.executable, "-m", "msgate", "serve", "--role", "keys"],
                                          env=env, stdout=keys_log.open("wb"), stderr=subprocess.STDOUT))
        rig.wait(rig.settled(1), timeout=180, what="the HE job after the keys role came back")
        [job] = rig.jobs()
        assert job.state == "done", job.error
        assert "he_replay" not in keys_log.read_text(errors="replace")
        result = read_result(store, job_id)
        assert result is not None and "he" in result.flags
        with store.db.session() as session:
            reads = session.exec(select(AuditEvent).where(AuditEvent.kind == AUDIT_KIND,
                                                          AuditEvent.subject == f"job:{job_id}")).all()
        assert len(reads) < job.attempts  # the first attempt's request, left in the queue, read nothing
        assert "expired" in keys_log.read_text(errors="replace")  # ... and was dropped, with a log line
    finally:
        rig.close()
