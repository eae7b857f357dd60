"""The Celery shell of publishing (STYLE.md "Tasks"): ``msgate.publish(job_id)`` on queue ``publish``.

The work is :func:`msgate.results.publish.publish_job`, idempotent by job id (a job with outbox
entries is not rendered twice), so ``acks_late`` redelivery is harmless. ``Transient`` (database
down; also an OSError or a database connection/pool error) retries with jittered exponential backoff;
``Rejected`` (no result, no FLAIR) and any other error (a defect) fail at once and are recorded on the job
(``publish_error``). A job handed off but never rendered (the task was lost with
a broker restart, or ran out of retries) is handed off again by the scheduler's reconciler
(:func:`msgate.workers.jobs.stalled_publish`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from sqlalchemy import exc as sa_exc

from msgate.errors import Rejected, Transient
from msgate.results.publish import publish_job
from msgate.storage.store import Store

log = logging.getLogger(__name__)
PUBLISH_TASK = "msgate.publish"
_store: Store | None = None


def use_store(store: Store | None) -> None:
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
        store = _current_store(settings)
        try:
            outcome = publish_job(store, job_id)
        except Rejected as exc:  # for good (no result, no FLAIR source): recorded, so no sweep retries it
            from msgate.workers import jobs

            jobs.mark_publish(store.db, job_id, error=exc.code)
            log.error("publish refused", extra={"job_id": job_id, "reason": exc.code})
            raise
        except Transient:
            raise
        except (OSError, sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
            # conditions that pass (a blob read on a flaky share, the pool exhausted): retried with backoff
            raise Transient(f"publish interrupted ({type(exc).__name__})", code="publish_io") from None
        except Exception as exc:  # a defect, not a condition that passes: recorded, so `jobs show`/`status`
            from msgate.workers import jobs  # show why there is no SR/ORU (`jobs retry` once it is fixed)

            reason = f"render_failed:{type(exc).__name__}"
            jobs.mark_publish(store.db, job_id, error=reason)
            log.exception("publish failed", extra={"job_id": job_id, "reason": reason})
            raise
        log.info("publish task finished", extra={"job_id": job_id, "status": outcome})
        return outcome

    _ = publish
