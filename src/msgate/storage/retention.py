"""Retention: purge the source images of studies whose results were delivered.

Two policies, both only for delivered studies (``study.delivered_at`` set by the outbox) that are
finished (not receiving again) and have no run waiting since that delivery (queued, running, or done
with its results not yet delivered): a study reopened by new instances keeps its bodies for that run.
- by age: ``storage.retention_days`` after delivery;
- by free space: while free space under the blob folder is under ``storage.purge_free_bytes``, oldest
  delivery first (local blob backend only: with PostgreSQL blob bodies, the space is the database's).
Purging deletes blob bodies, erases their wrapped data keys (a backup copy of a body can no longer be
decrypted) and marks the rows; index rows and the audit trail stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, exists, or_
from sqlalchemy.orm import aliased
from sqlmodel import col, func, select

from msgate.storage import audit
from msgate.storage.blobs import free_bytes
from msgate.storage.models import Blob, Instance, Job, Study, utcnow
from msgate.storage.repo_studies import FINAL_STATES
from msgate.storage.store import Store


@dataclass
class PurgeReport:
    dry_run: bool
    studies: list[int] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    by_age: int = 0
    by_space: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _run_after() -> Any:
    """A run that still needs the images: queued or running whenever it was made (``jobs retry`` re-queues
    an old job with its old ``created_at``), or done after the delivery (its results not delivered yet)."""
    return exists().where(col(Job.study_id) == col(Study.id), or_(
        col(Job.state).in_(("queued", "running")),
        and_(col(Job.state) == "done", col(Job.created_at) > col(Study.delivered_at))))


def _arrived_after() -> Any:
    """An instance acknowledged after the delivery: the study is being reopened (the listener commits the
    instance before it reopens the study, so the state may still say finished)."""
    late = aliased(Instance)
    return exists().where(late.study_id == col(Study.id), late.received_at > col(Study.delivered_at))


def _eligible() -> list[Any]:
    return [col(Study.delivered_at).is_not(None), col(Study.purged_at).is_(None),
            col(Study.state).in_(FINAL_STATES), ~_run_after(), ~_arrived_after()]


def _candidates(store: Store) -> list[tuple[int, Any, int]]:
    """Delivered, unpurged, finished studies without a run or an instance after that delivery, oldest
    delivery first, with their stored bytes."""
    with store.db.session() as session:
        rows = session.exec(
            select(Study.id, Study.delivered_at, func.coalesce(func.sum(Blob.stored_size), 0))
            .join(Instance, col(Instance.study_id) == col(Study.id), isouter=True)
            .join(Blob, col(Blob.id) == col(Instance.blob_id), isouter=True)
            .where(*_eligible())
            .group_by(Study.id, Study.delivered_at).order_by(col(Study.delivered_at))
        ).all()
    return [(int(sid), delivered, int(size)) for sid, delivered, size in rows]  # type: ignore[arg-type]


def purge(store: Store, *, dry_run: bool = False) -> PurgeReport:
    settings = store.settings.storage
    report = PurgeReport(dry_run=dry_run)
    cutoff = utcnow() - timedelta(days=settings.retention_days)
    # by free space only where purging frees that space: PostgreSQL blob bodies live on the database's
    # disk, which msgate cannot measure, so measuring MSGATE_HOME purged every delivered study there
    free = free_bytes(store.settings.blob_dir) if settings.blob_backend == "local" else float("inf")
    for study_id, delivered, size in _candidates(store):
        by_age = delivered <= cutoff
        if not by_age and free >= settings.purge_free_bytes:
            continue
        purged = _purge_study(store, study_id, dry_run)
        if purged is None:  # changed since the candidates were listed (new instances, a new run)
            continue
        if by_age:
            report.by_age += 1
        else:
            report.by_space += 1
            free += size
        report.studies.append(study_id)
        report.bytes += size
        report.blobs += purged
    return report


def _purge_study(store: Store, study_id: int, dry_run: bool) -> int | None:
    """Purge one study's bodies; None when it is no longer eligible, re-checked under the study's row
    lock, so an instance acknowledged since the candidates were listed is never purged."""
    with store.db.session() as session:
        study = session.exec(select(Study).where(Study.id == study_id, *_eligible()).with_for_update()).first()
        if study is None:
            return None
        blobs = session.exec(
            select(Blob).join(Instance, col(Instance.blob_id) == col(Blob.id))
            .where(Instance.study_id == study_id, col(Blob.purged_at).is_(None),
                   col(Instance.received_at) <= study.delivered_at)
        ).all()
        if dry_run:
            return len(blobs)
        for blob in blobs:
            store.blobs.purge(session, blob)
        study.purged_at = utcnow()
        session.add(study)
        audit.append(session, kind="retention.purge", actor="retention", subject=f"study:{study_id}",
                     detail={"blobs": len(blobs)})
        return len(blobs)
