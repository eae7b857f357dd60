"""The Celery shells (STYLE.md "Tasks"): serialisation, retries and time limits only.

``msgate.infer(job_id)`` (queue ``gpu``) -> :func:`msgate.workers.inference.run`. Safe to run twice:
the result is upserted by job id and every state change is conditional. ``Transient`` retries with
exponential backoff (jittered, capped); ``Rejected`` fails at once (the job row holds the reason).

Time limits: Celery applies ``soft_time_limit``/``time_limit`` from a pool's parent process, so the
solo pool (one process per GPU, CUDA never forked) never applied them. :class:`Watchdog` does: past
the soft limit it logs a warning; past the hard limit it releases the jobs the task holds (an attempt
counted, reason "exceeded the hard time limit") and ends the process with ``os._exit``, because a
thread stuck in a native call (a CUDA kernel, a hung driver) cannot be interrupted; the supervisor
(systemd, compose) restarts the worker and the unacknowledged message is delivered again. With
``serve --role all`` that restarts every role of the process.
The publish task ``msgate.publish`` (queue ``publish``) belongs to ``msgate.results.tasks``; here it
is only sent by name.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import Celery, Task

from msgate.errors import Rejected, Transient
from msgate.workers import celery_app, inference, jobs, runtime

log = logging.getLogger(__name__)
HARD_LIMIT_EXIT = 70  # the worker's exit status when the watchdog ends it (EX_SOFTWARE)
RELEASE_SECONDS = 10.0  # how long the watchdog waits for the database before it ends the process anyway


def send_infer(app: Celery, job_id: str) -> None:
    app.send_task(celery_app.INFER_TASK, args=[job_id])


def send_publish(app: Celery, job_id: str) -> None:
    app.send_task(celery_app.PUBLISH_TASK, args=[job_id])


def register(app: Celery) -> None:
    settings = app.msgate_settings  # type: ignore[attr-defined]
    wk = settings.workers

    @app.task(name=celery_app.INFER_TASK, bind=True, shared=False, acks_late=True, reject_on_worker_lost=True,
              autoretry_for=(Transient,), retry_backoff=2, retry_backoff_max=int(wk.retry_backoff_max),
              retry_jitter=True, max_retries=wk.max_retries, ignore_result=True)
    def infer(self: Task[Any, Any], job_id: str) -> str:
        """Run one job (and the batch it gathers), under the watchdog's time limits."""
        rt = runtime.get(settings)
        held: list[str] = []
        try:
            with Watchdog(rt, job_id, held):
                outcome = inference.run(rt, job_id, task_id=self.request.id,
                                        handoff=lambda jid: send_publish(app, jid), held=held)
        except Transient as exc:
            if self.request.retries >= wk.max_retries:
                _give_up(rt, job_id, f"gave up after {self.request.retries} retries: {exc}")
                raise Rejected(str(exc), code=exc.code) from None
            raise
        log.info("infer task finished", extra={"job_id": job_id, "status": outcome})
        return outcome

    _ = infer


def _give_up(rt: runtime.Runtime, job_id: str, reason: str) -> None:
    job = jobs.state_of(rt.store.db, job_id)
    if job is None:
        return
    if job.state == "queued":
        jobs.claim(rt.store.db, job_id, owner=rt.owner, lease_seconds=rt.settings.workers.lease_seconds,
                   via="give_up")
    jobs.finish(rt.store.db, job_id, owner=rt.owner, state="failed", stages={}, error=reason)


class Watchdog:
    """The soft and hard time limits of one ``msgate.infer`` task, from a thread (see the module
    docstring). ``held`` lists the jobs the task has claimed so far."""

    def __init__(self, rt: runtime.Runtime, job_id: str, held: list[str]) -> None:
        self.rt, self.job_id, self.held = rt, job_id, held
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="infer-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()

    def _watch(self) -> None:
        wk = self.rt.settings.workers
        soft = min(wk.soft_time_limit, wk.hard_time_limit)
        if self._done.wait(soft):
            return
        if soft < wk.hard_time_limit:
            log.warning("task passed the soft time limit",
                        extra={"job_id": self.job_id, "reason": "soft_time_limit"})
            if self._done.wait(wk.hard_time_limit - soft):
                return
        reason = f"exceeded the hard time limit of {wk.hard_time_limit:.0f} s"
        log.error("task exceeded the hard time limit; its jobs are released and the worker process ends",
                  extra={"job_id": self.job_id, "reason": "hard_time_limit", "count": len(self.held)})
        recorder = threading.Thread(target=self._release, args=(reason,), name="infer-watchdog-release",
                                    daemon=True)
        recorder.start()
        recorder.join(RELEASE_SECONDS)  # a database that does not answer must not keep the process alive
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(HARD_LIMIT_EXIT)

    def _release(self, reason: str) -> None:
        max_attempts = self.rt.settings.workers.max_retries + 1
        for jid in list(self.held):
            try:
                jobs.release(self.rt.store.db, jid, owner=self.rt.owner, error=reason,
                             max_attempts=max_attempts)
            except Exception:  # the lease expires instead; the reconciler re-queues the job
                log.exception("could not release a job at the hard time limit", extra={"job_id": jid})
