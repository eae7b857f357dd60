"""The Celery shells (STYLE.md "Tasks"): serialisation, retries and time limits only.

``msgate.infer(job_id)`` (queue ``gpu``) -> :func:`msgate.workers.inference.run`. Safe to run twice:
the result is upserted by job id and every state change is conditional. ``Transient`` retries with
exponential backoff (jittered, capped); ``Rejected`` fails at once (the job row holds the reason).
The publish task ``msgate.publish`` (queue ``publish``) belongs to ``msgate.results.tasks``; here it
is only sent by name.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded

from msgate.errors import Rejected, Transient
from msgate.workers import celery_app, inference, jobs, runtime

log = logging.getLogger(__name__)


def send_infer(app: Celery, job_id: str) -> None:
    app.send_task(celery_app.INFER_TASK, args=[job_id])


def send_publish(app: Celery, job_id: str) -> None:
    app.send_task(celery_app.PUBLISH_TASK, args=[job_id])


def register(app: Celery) -> None:
    settings = app.msgate_settings  # type: ignore[attr-defined]
    wk = settings.workers

    @app.task(name=celery_app.INFER_TASK, bind=True, shared=False, acks_late=True, reject_on_worker_lost=True,
              autoretry_for=(Transient,), retry_backoff=2, retry_backoff_max=int(wk.retry_backoff_max),
              retry_jitter=True, max_retries=wk.max_retries, soft_time_limit=wk.soft_time_limit,
              time_limit=wk.hard_time_limit, ignore_result=True)
    def infer(self: Task[Any, Any], job_id: str) -> str:
        """Run one job (and the batch it gathers)."""
        rt = runtime.get(settings)
        try:
            outcome = inference.run(rt, job_id, task_id=self.request.id,
                                    handoff=lambda jid: send_publish(app, jid))
        except Transient as exc:
            if self.request.retries >= wk.max_retries:
                _give_up(rt, job_id, f"gave up after {self.request.retries} retries: {exc}")
                raise Rejected(str(exc), code=exc.code) from None
            raise
        except SoftTimeLimitExceeded:
            _give_up(rt, job_id, f"exceeded the soft time limit of {wk.soft_time_limit:.0f} s")
            raise
        log.info("infer task finished", extra={"job_id": job_id, "status": outcome})
        return outcome

    _ = infer


def _give_up(rt: runtime.Runtime, job_id: str, reason: str) -> None:
    job = jobs.state_of(rt.store.db, job_id)
    if job is None:
        return
    if job.state == "queued":
        jobs.claim(rt.store.db, job_id, owner=rt.owner, lease_seconds=rt.settings.workers.lease_seconds, via="batch")
    jobs.finish(rt.store.db, job_id, owner=rt.owner, state="failed", stages={}, error=reason)
