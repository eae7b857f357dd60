"""The Celery shell of publishing (STYLE.md "Tasks"): ``msgate.publish(job_id)`` on queue ``publish``.

The work is :func:`msgate.results.publish.publish_job`, idempotent by job id (a job with outbox
entries is not rendered twice), so ``acks_late`` redelivery is harmless. ``Transient`` (database
down) retries with jittered exponential backoff; ``Rejected`` (no result, no FLAIR) fails at once.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task

from msgate.errors import Transient
from msgate.results.publish import publish_job

log = logging.getLogger(__name__)
PUBLISH_TASK = "msgate.publish"


def register(app: Celery) -> None:
    """Called by :func:`msgate.workers.celery_app.build_app`."""
    settings = app.msgate_settings  # type: ignore[attr-defined]

    @app.task(name=PUBLISH_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, autoretry_for=(Transient,),
              retry_backoff=2, retry_backoff_max=600, retry_jitter=True, max_retries=20, ignore_result=True)
    def publish(self: Task[Any, Any], job_id: str) -> str:
        from msgate.workers import runtime

        outcome = publish_job(runtime.get(settings).store, job_id)
        log.info("publish task finished", extra={"job_id": job_id, "status": outcome})
        return outcome

    _ = publish
