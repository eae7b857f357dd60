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
from msgate.storage.store import Store

log = logging.getLogger(__name__)
PUBLISH_TASK = "msgate.publish"
_store: Store | None = None


def use_store(store: Store) -> None:
    """The publish role hands its open store to the task (otherwise the worker runtime's is used)."""
    global _store
    _store = store


def _current_store(settings: Any) -> Store:
    if _store is not None:
        return _store
    from msgate.workers import runtime

    return runtime.get(settings).store


def register(app: Celery) -> None:
    """Called by :func:`msgate.workers.celery_app.build_app`."""
    settings = app.msgate_settings  # type: ignore[attr-defined]

    @app.task(name=PUBLISH_TASK, bind=True, shared=False, acks_late=True, reject_on_worker_lost=True,
              autoretry_for=(Transient,), retry_backoff=2, retry_backoff_max=600, retry_jitter=True, max_retries=20,
              ignore_result=True)
    def publish(self: Task[Any, Any], job_id: str) -> str:
        outcome = publish_job(_current_store(settings), job_id)
        log.info("publish task finished", extra={"job_id": job_id, "status": outcome})
        return outcome

    _ = publish
