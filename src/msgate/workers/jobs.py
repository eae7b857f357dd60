"""Job rows: creation (with supersession), claims with leases, outcomes, and the reconciler's queries.

States: ``queued -> running -> done | failed``; ``superseded`` (a newer job for the same study) and
``cancelled`` (operator) can end a queued or running job, and a running task then stores its result
but does not hand off. Every change is a conditional update on the current state, so two workers,
a retry and an operator cannot both win.

A claim holds a *lease* (``flags.lease_until``, epoch seconds = now + hard time limit + margin).
Who may claim a job:
- its own message (``via="message"``) claims a queued job; it also takes over a running job that
  was claimed by the *same* task id (the message was delivered again: its first holder died), or
  whose lease ran out;
- dynamic batching (``via="batch"``) claims queued jobs only, and only *fresh* ones (never claimed:
  ``attempts == 0``) planned for the worker's model version. A job that lost its worker (counted in
  ``flags.lost``) or was released after a failed attempt runs alone, so a case that kills or hangs its
  worker uses up only its own attempts, never those of the cases it was batched with.
The reconciler returns running jobs with an expired lease to ``queued`` and republishes them. A worker
whose model version is not the job's hands it back (:func:`hand_back`) without counting an attempt.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from msgate.storage import audit
from msgate.storage.db import Database
from msgate.storage.models import Job, Result, utcnow

ACTIVE = ("queued", "running")
SUPERSEDABLE = ("queued", "running", "done", "failed")
FINAL = ("done", "failed", "superseded", "cancelled")
CREATE_LOCK = 0x6D736A62  # pg_advisory_xact_lock(class, study id) held while a study's job is created ("msjb")


@dataclass(frozen=True)
class Claim:
    job_id: str
    study_id: int
    flags: dict[str, Any]
    created_at: datetime
    published_at: datetime | None
    attempts: int  # this claim included: more than 1 means an earlier attempt did not finish
    model_version: str


def _with(flags: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A new dict (JSON columns are not mutation-tracked)."""
    out = dict(flags)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def chain_key(content_key: str, supersedes_id: str | None) -> str:
    """The unique ``Job.idem_key``: the content key and the job it supersedes (none: the study's first)."""
    return hashlib.sha256(f"{content_key}|{supersedes_id or ''}".encode()).hexdigest()


def create(db: Database, *, study_id: int, idem_key: str, model_version: str, flags: dict[str, Any],
           actor: str = "scheduler", ready_at: datetime | None = None) -> Job | None:
    """Insert a queued job for the content key ``idem_key`` (the plan's key) unless the study's newest job
    has that content; it supersedes the study's older jobs. Only the newest job counts: a content that
    comes back after a correction (an A08 reverted, a lab value withdrawn, the original series re-sent)
    runs again, and its result replaces the one computed from the wrong data.

    When the newest job has that content, nothing is created and ``ready_at`` (the ``Study.ready_at`` the
    plan was made for) is recorded on it as ``planned_ready_at``: the scheduler then does not plan the
    study again until it is ready again (a study re-sent unchanged was planned on every scan).

    Creates for one study are serialized (PostgreSQL: a transaction advisory lock on the study id, not its
    row, which the indexer locks while it holds the audit head; SQLite: ``BEGIN IMMEDIATE`` serializes every
    writer), so the newest job read here is the newest there is: two schedulers never create two jobs for
    one change, nor two active jobs for two changes. The unique ``Job.idem_key`` (content + superseded job)
    stays the backstop."""
    try:
        with db.session() as session:
            if not db.is_sqlite:
                session.execute(text("SELECT pg_advisory_xact_lock(CAST(:cls AS integer), CAST(:study AS integer))"),
                                {"cls": CREATE_LOCK, "study": study_id})
            # the chain links to the study's newest job whatever its state: a cancelled or superseded one
            # in between used to break it (no correction note, the old result's entries left pending)
            newest = session.exec(select(Job).where(Job.study_id == study_id)
                                  .order_by(col(Job.created_at).desc(), col(Job.id))).first()
            if newest is not None and newest.content_key == idem_key:
                if ready_at is not None and (newest.planned_ready_at is None or newest.planned_ready_at < ready_at):
                    session.execute(update(Job).where(col(Job.id) == newest.id).values(planned_ready_at=ready_at))
                return None
            older = session.exec(select(Job).where(Job.study_id == study_id, col(Job.state).in_(SUPERSEDABLE))
                                 .order_by(col(Job.created_at).desc()).with_for_update()).all()
            previous = newest.id if newest is not None else None
            job = Job(study_id=study_id, idem_key=chain_key(idem_key, previous), content_key=idem_key,
                      model_version=model_version[:64], flags=flags, supersedes_id=previous)
            for old in older:
                old.state, old.finished_at = "superseded", old.finished_at or utcnow()
                session.add(old)
            session.add(job)
            session.flush()
            audit.append(session, kind="job.created", actor=actor, subject=f"job:{job.id}",
                         detail={"study_id": study_id, "supersedes": job.supersedes_id,
                                 "superseded": [o.id for o in older]})
            return job
    except IntegrityError:
        return None  # another scheduler created this content in this place of the chain first


def mark_published(db: Database, job_id: str) -> None:
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is not None and job.published_at is None:
            job.published_at = utcnow()
            session.add(job)


def claim(db: Database, job_id: str, *, owner: str, lease_seconds: float, via: str,
          task_id: str | None = None) -> Claim | None:
    """Move a job to running for ``owner`` for ``lease_seconds`` (after which the reconciler re-queues it);
    None if someone else holds it or it is finished."""
    with db.session() as session:
        job = session.exec(select(Job).where(Job.id == job_id).with_for_update()).first()
        if job is None or not _claimable(job, via, task_id):
            return None
        now = utcnow()
        if job.state == "running":  # taken over from a worker that died (lease out, or its message redelivered)
            job.flags = _with(job.flags, lost=int(job.flags.get("lost", 0)) + 1)
        job.flags = _with(job.flags, owner=owner, lease_until=time.time() + lease_seconds,
                          claim=via, task_id=task_id if via == "message" else job.flags.get("task_id"))
        job.state, job.started_at, job.attempts, job.error = "running", now, job.attempts + 1, None
        stages = dict(job.stages)
        if job.published_at is not None and "queue_wait_ms" not in stages:
            stages["queue_wait_ms"] = round((now - job.published_at).total_seconds() * 1000, 1)
        job.stages = stages
        session.add(job)
        return Claim(job.id, job.study_id, dict(job.flags), job.created_at, job.published_at, job.attempts,
                     job.model_version)


def _claimable(job: Job, via: str, task_id: str | None) -> bool:
    if job.state == "queued":
        return via != "batch" or job.attempts == 0
    if job.state != "running" or via != "message":
        return False
    lease_expired = float(job.flags.get("lease_until", 0)) < time.time()
    redelivered = task_id is not None and job.flags.get("task_id") == task_id and job.flags.get("claim") == "message"
    return lease_expired or redelivered


def queued_ids(db: Database, *, exclude: Sequence[str], limit: int, model_version: str) -> list[str]:
    """Queued jobs that a batch could take, oldest first: fresh ones (never claimed) planned for
    ``model_version``."""
    if limit <= 0:
        return []
    with db.session() as session:
        rows = session.exec(select(Job.id).where(Job.state == "queued", col(Job.id).not_in(list(exclude)),
                                                 Job.attempts == 0, Job.model_version == model_version)
                            .order_by(col(Job.created_at)).limit(limit)).all()
    return list(rows)


def state_of(db: Database, job_id: str) -> Job | None:
    with db.session() as session:
        return session.get(Job, job_id)


def finish(db: Database, job_id: str, *, owner: str, state: str, stages: dict[str, Any],
           error: str | None = None, flags: dict[str, Any] | None = None) -> bool:
    """running -> ``state`` if ``owner`` still holds the job; False if it was superseded/cancelled/taken."""
    with db.session() as session:
        job = session.exec(select(Job).where(Job.id == job_id).with_for_update()).first()
        if job is None:
            return False
        job.stages = {**job.stages, **stages}
        if job.state != "running" or job.flags.get("owner") != owner:
            session.add(job)
            return False
        job.state, job.finished_at, job.error = state, utcnow(), error[:512] if error else None
        job.flags = _with({**job.flags, **(flags or {})}, lease_until=None)
        session.add(job)
        audit.append(session, kind=f"job.{state}", actor=owner[:64], subject=f"job:{job_id}",
                     detail={"reason": (error or "")[:200]})
        return True


def release(db: Database, job_id: str, *, owner: str, error: str, max_attempts: int | None = None) -> bool:
    """running -> queued (a failed attempt); the message's retry or the reconciler runs it again. After
    ``max_attempts`` claims the job fails instead."""
    with db.session() as session:
        job = session.exec(select(Job).where(Job.id == job_id).with_for_update()).first()
        if job is None or job.state != "running" or job.flags.get("owner") != owner:
            return False
        _requeue_or_fail(session, job, error, max_attempts, actor=owner)
        return True


MAX_HANDBACKS = 24  # with the growing re-send pause, about two days of no worker having the job's version


def hand_back(db: Database, job_id: str, *, owner: str, error: str, max_handbacks: int = MAX_HANDBACKS) -> bool:
    """running -> queued without counting the attempt: this worker must not run the job (another model
    version). It is re-sent by the reconciler after a backoff that grows with ``flags.handbacks``, so a
    worker with the job's version (or the scheduler, planning it again for the new version) gets it.
    After ``max_handbacks`` the job fails with the reason (a checkpoint rolled back under a queued job, a
    version skew nobody noticed): it shows in ``jobs`` and ``status`` instead of bouncing forever."""
    with db.session() as session:
        job = session.exec(select(Job).where(Job.id == job_id).with_for_update()).first()
        if job is None or job.state != "running" or job.flags.get("owner") != owner:
            return False
        handbacks = int(job.flags.get("handbacks", 0)) + 1
        job.flags = _with(job.flags, lease_until=None, owner=None, released_at=utcnow().isoformat(),
                          handbacks=handbacks)
        job.attempts = max(0, job.attempts - 1)
        if handbacks >= max_handbacks:
            reason = f"{error}; no worker with that version took it after {handbacks} hand-backs"
            job.state, job.finished_at, job.error = "failed", utcnow(), reason[:512]
            audit.append(session, kind="job.failed", actor=owner[:64], subject=f"job:{job.id}",
                         detail={"reason": reason[:200]})
        else:
            job.state, job.error, job.published_at = "queued", error[:512], None
        session.add(job)
        return True


def _requeue_or_fail(session: Session, job: Job, error: str, max_attempts: int | None, *, actor: str) -> None:
    job.flags = _with(job.flags, lease_until=None, owner=None)
    if max_attempts is not None and job.attempts >= max_attempts:
        reason = f"{error}; failed after {job.attempts} attempts"
        job.state, job.finished_at, job.error = "failed", utcnow(), reason[:512]
        audit.append(session, kind="job.failed", actor=actor[:64], subject=f"job:{job.id}",
                     detail={"reason": reason[:200]})
    else:
        job.state, job.error, job.published_at = "queued", error[:512], None  # the reconciler re-sends it
        job.flags = _with(job.flags, released_at=utcnow().isoformat())  # ... once the message's retry is due
    session.add(job)


def mark_handed_off(db: Database, job_id: str) -> None:
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is not None and "handoff_at" not in job.flags:
            job.flags = _with(job.flags, handoff_at=utcnow().isoformat())
            session.add(job)


def stalled_publish(db: Database, *, older_than: float, max_handoffs: int, limit: int = 200) -> list[str]:
    """Done jobs handed to publishing more than ``older_than`` seconds ago that were never rendered (no
    ``rendered_at``, no outbox entry) and never refused (no ``publish_error``), with fewer than
    ``max_handoffs`` hand-offs: their publish task was lost (a broker restarted without persistence) or
    gave up on its retries (a long database outage). Publishing is idempotent, so a hand-off again is safe."""
    cutoff = utcnow() - timedelta(seconds=older_than)
    query = _unpublished_done(cutoff)

    def wanted(job: Job) -> bool:
        flags = job.flags
        if ("handoff_at" not in flags or "rendered_at" in flags or "publish_error" in flags
                or int(flags.get("handoffs", 1)) >= max_handoffs):
            return False
        return datetime.fromisoformat(str(flags["handoff_at"])) <= cutoff

    return _paged(db, query, wanted, limit)


def _paged(db: Database, query: Any, wanted: Callable[[Job], bool], limit: int, page: int = 500,
           scan: int = 20_000) -> list[str]:
    """Ids of the jobs ``query`` returns (newest finished first) that ``wanted`` keeps, page by page: the
    JSON flags are filtered here, so one fixed window could fill up with jobs that never qualify (refused
    or rendered ones) and hide those that do."""
    out: list[str] = []
    with db.session() as session:
        for offset in range(0, scan, page):
            rows = session.exec(query.order_by(col(Job.finished_at).desc(), col(Job.id))
                                .offset(offset).limit(page)).all()
            out.extend(j.id for j in rows if wanted(j))
            if len(out) >= limit or len(rows) < page:
                break
    return out[:limit]


def claim_handoff(db: Database, job_id: str, *, again_before: datetime | None = None) -> bool:
    """Take the hand-off of a job to publishing before sending it, under the job row's lock, so two
    schedulers (HA) never both send it: the first time (no ``handoff_at`` yet), or ``again_before`` a
    time (its last hand-off was earlier: the stalled-publish sweep). False when another took it."""
    with db.session() as session:
        job = session.exec(select(Job).where(Job.id == job_id).with_for_update()).first()
        if job is None or job.state != "done" or "rendered_at" in job.flags:
            return False
        last = job.flags.get("handoff_at")
        if again_before is None:
            if last is not None:
                return False
            job.flags = _with(job.flags, handoff_at=utcnow().isoformat())
        else:
            if last is None or datetime.fromisoformat(str(last)) > again_before:
                return False
            job.flags = _with(job.flags, handoff_at=utcnow().isoformat(),
                              handoffs=int(job.flags.get("handoffs", 1)) + 1)
            audit.append(session, kind="job.handoff", actor="scheduler", subject=f"job:{job_id}",
                         detail={"handoffs": job.flags["handoffs"], "reason": "nothing rendered"})
        session.add(job)
        return True


def mark_publish(db: Database, job_id: str, *, rendered: bool = False, error: str | None = None) -> None:
    """Record on the job that its results were rendered (``rendered_at``), or that publishing refused it
    for good (``publish_error``: a code, no PHI)."""
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is not None:
            now = utcnow().isoformat()
            job.flags = _with(job.flags, **({"rendered_at": now} if rendered else {"publish_error": error}))
            session.add(job)


def unpublished(db: Database, *, older_than: float, backoff_max: float = 300.0, limit: int = 200) -> list[str]:
    """Queued jobs whose message was never sent (or is presumed lost). A job released after a failed
    attempt waits for its own message's retry (jittered backoff 2 s x 2^attempt, at most ``backoff_max``)
    plus ``older_than``: re-sending it at once spent the whole retry budget in seconds, so a short outage
    (the key service restarting) failed the job for good."""
    now = utcnow()
    cutoff = now - timedelta(seconds=older_than)
    with db.session() as session:
        rows = session.exec(select(Job).where(Job.state == "queued", col(Job.published_at).is_(None),
                                              col(Job.created_at) <= cutoff)
                            .order_by(col(Job.created_at)).limit(limit * 5)).all()
    out = []
    for job in rows:
        released = job.flags.get("released_at")
        if released is not None:
            tries = job.attempts + int(job.flags.get("handbacks", 0))
            wait = older_than + 1.5 * min(backoff_max, 2.0 * 2 ** max(0, tries - 1))  # 1.5: the jitter
            if datetime.fromisoformat(str(released)) > now - timedelta(seconds=wait):
                continue
        out.append(job.id)
    return out[:limit]


def expire_leases(db: Database, *, max_attempts: int | None = None) -> list[str]:
    """Running jobs whose lease ran out (worker lost): back to queued, unpublished, ``flags.lost``
    counted (such a job is not batched again). A job that has lost its worker ``max_attempts`` times (it
    kills the worker: out of memory, a driver crash) fails."""
    now, out = time.time(), []
    with db.session() as session:
        for job in session.exec(select(Job).where(Job.state == "running").with_for_update()).all():
            if float(job.flags.get("lease_until", 0)) < now:
                job.flags = _with(job.flags, lost=int(job.flags.get("lost", 0)) + 1)
                _requeue_or_fail(session, job, "worker lost (lease expired)", max_attempts, actor="scheduler")
                out.append(job.id)
    return out


def stale_version_studies(db: Database, *, model_version: str, created_before: datetime | None = None,
                          limit: int = 500) -> set[int]:
    """Studies with a queued job planned for another model version than ``model_version`` (the
    checkpoint was replaced since), created before ``created_before`` (when the caller took its version):
    the scheduler plans them again, which supersedes that job."""
    query = select(Job.study_id).where(Job.state == "queued", Job.model_version != model_version[:64])
    if created_before is not None:
        query = query.where(col(Job.created_at) < created_before)
    with db.session() as session:
        rows = session.exec(query.limit(limit)).all()
    return set(rows)


def not_handed_off(db: Database, *, older_than: float, limit: int = 200) -> list[str]:
    cutoff = utcnow() - timedelta(seconds=older_than)
    return _paged(db, _unpublished_done(cutoff), lambda job: "handoff_at" not in job.flags, limit)


HANDOFF_WINDOW = timedelta(days=30)
"""Done jobs older than this are not handed to publishing by the reconciler any more (an operator can)."""


def _unpublished_done(finished_before: datetime) -> Any:
    """Done jobs finished between :data:`HANDOFF_WINDOW` ago and ``finished_before`` with no outbox
    entry: the only ones a hand-off can concern (published jobs are most rows and are left out in SQL)."""
    from msgate.storage.models import OutboxEntry

    return select(Job).where(Job.state == "done", col(Job.finished_at) <= finished_before,
                             col(Job.finished_at) >= utcnow() - HANDOFF_WINDOW, col(Job.id).not_in(
                                 select(OutboxEntry.job_id).where(col(OutboxEntry.job_id).is_not(None))))


def result_count(session: Session, job_id: str) -> int:
    return len(session.exec(select(Result.id).where(Result.job_id == job_id)).all())
