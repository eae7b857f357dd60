"""Which outbox entries belong to a superseded result, and how they are retired.

A correction (a later job of the same study that queued results of its own) makes the earlier job's
undelivered objects out of date: sent after the correction, they would leave the EHR or the PACS on the
old values. The outbox asks :func:`superseded` before it sends, retries or requeues an entry, and
:func:`retire` drops one with its audit trail.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from sqlmodel import Session, col, select

from msgate.storage import audit
from msgate.storage.models import Job, OutboxAttempt, OutboxEntry

SUPERSEDED_DETAIL = "replaced by a later result of the same study before it was delivered"


def superseded(session: Session, job_ids: Sequence[str | None]) -> dict[str, str]:
    """The jobs of ``job_ids`` superseded by a later job of their study (``Job.supersedes_id`` followed
    forward, through jobs that queued nothing) that queued results of its own, each mapped to that job:
    their undelivered objects are out of date and must never be sent or retried."""
    ids = {job_id for job_id in job_ids if job_id}
    if not ids:
        return {}
    studies = set(session.exec(select(Job.study_id).where(col(Job.id).in_(list(ids)))).all())
    after: dict[str, list[str]] = defaultdict(list)
    for job_id, earlier in session.exec(select(Job.id, Job.supersedes_id).where(  # study_id is indexed
            col(Job.study_id).in_(list(studies)), col(Job.supersedes_id).is_not(None))).all():
        after[earlier].append(job_id)
    chains = {origin: _successors(after, origin) for origin in ids}
    later = {job_id for chain in chains.values() for job_id in chain}
    queued = set(session.exec(select(OutboxEntry.job_id).where(col(OutboxEntry.job_id).in_(list(later)))
                              .distinct()).all()) if later else set()
    return {origin: first for origin, chain in chains.items()
            if (first := next((j for j in chain if j in queued), None)) is not None}


def _successors(after: dict[str, list[str]], origin: str) -> list[str]:
    out: list[str] = []
    seen, todo = {origin}, list(after.get(origin, ()))
    while todo:
        job_id = todo.pop(0)
        if job_id not in seen:
            seen.add(job_id)
            out.append(job_id)
            todo.extend(after.get(job_id, ()))
    return out


def retire(session: Session, entry: OutboxEntry, *, actor: str) -> None:
    """Drop an entry of a superseded job, with a ``superseded`` attempt row and an audited ``outbox.drop``."""
    entry.state = "dropped"
    session.add(entry)
    session.add(OutboxAttempt(entry_id=entry.id, outcome="superseded", detail=SUPERSEDED_DETAIL))
    audit.append(session, kind="outbox.drop", actor=actor, subject=f"outbox:{entry.id}",
                 detail={"job_id": entry.job_id, "destination": entry.destination, "reason": "superseded"})
    session.flush()
