"""Retention: purge the source images of finished studies that have nothing left to deliver.

Two kinds of study, each finished (``ready``, ``stable``, ``stored`` or ``ignored``) with no run to come
(queued or running) and no result waiting in the outbox (pending, sending or dead-lettered):
- *delivered* (``study.delivered_at`` set by the outbox) with no run or instance since that delivery: a
  study reopened by new instances keeps its bodies for that run; its age counts from the delivery;
- *unused*: no result to deliver, because it never had one (``stored``, ``ignored``, ``stable``; ``ready``
  whose jobs all failed, were cancelled or superseded) or got instances since its delivery that brought
  no new result. Its age counts from its last instance. A ``ready`` one needs a job (without one it is the
  scheduler's to plan) and waits out the scheduler's planning window (``workers.ehr_deadline_seconds +
  lookback_seconds`` after readiness, in which an EHR change plans it again). Its tracker decision (the
  ``study.<state>`` audit event) must be later than its last instance: the listener commits an instance
  before it reopens the study (after a crash, at its next start), and that body is kept.
Two policies:
- by age: ``storage.retention_days`` after delivery; ``storage.unused_retention_days`` (unset:
  ``retention_days``) after an unused study's last instance;
- by free space: while free space under the blob folder is under ``storage.purge_free_bytes``, unused
  studies first (oldest last instance first), then delivered ones (oldest delivery first) (local blob
  backend only: with PostgreSQL blob bodies, the space is the database's).
Purging deletes blob bodies, erases their wrapped data keys (a backup copy of a body can no longer be
decrypted) and marks the rows; index rows and the audit trail stay (``retention.purge``, with ``policy``
``delivered`` or ``unused``). It also erases the interface engine's encrypted free text of the study's
outbox attempts (``outbox_attempt.peer_text_enc``, which may name the patient); the purge's audit event
names those attempts, for ``outbox show``. A study purged by an msgate that kept that text has it erased by
the next purge (audit ``retention.erase``).

``msgate db purge --study ID`` (:func:`purge_one`) purges one such study now, whatever its age, audited with
the operator's name.

One purge at a time (:func:`exclusive`, across processes): ``msgate db purge`` waits for a running one,
the scheduler role's runs (:mod:`msgate.storage.retention_schedule`) skip while another holds it. Each
study is purged in its own transaction under its row lock, so a purge never holds writers back for long.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, make_url, or_, text, update
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, func, select

from msgate.storage import audit
from msgate.storage.blobs import free_bytes
from msgate.storage.db import Database
from msgate.storage.models import (OUTBOX_OPEN_STATES, AuditEvent, Blob, Instance, Job, OutboxAttempt, OutboxEntry,
                                   Study, utcnow)
from msgate.storage.repo_studies import FINAL_STATES
from msgate.storage.store import Store

PURGE_LOCK = 0x6D736761_7465_03  # pg_advisory_lock key of retention purges ("msgate" 3)
TEXT_EVENTS = ("retention.purge", "retention.erase")  # audit kinds whose ``attempt_ids`` had their text erased
UNDELIVERED = OUTBOX_OPEN_STATES  # outbox entry states of a result still to deliver
DECISIONS = tuple(sorted(f"study.{state}" for state in FINAL_STATES))  # the tracker's audit kinds (repo_studies)


@dataclass
class PurgeReport:
    dry_run: bool
    studies: list[int] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    by_age: int = 0
    by_space: int = 0
    unused: int = 0  # of ``studies``: those with no result to deliver
    engine_texts: int = 0  # outbox attempts whose engine text was erased
    skipped: bool = False  # another purge was running (``wait`` False)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _run_after() -> Any:
    """A run that still needs the images: queued or running whenever it was made (``jobs retry`` re-queues
    an old job with its old ``created_at``), or done with its results not delivered yet (done after the
    delivery, or the study never delivered)."""
    return exists().where(col(Job.study_id) == col(Study.id), or_(
        col(Job.state).in_(("queued", "running")),
        and_(col(Job.state) == "done", or_(col(Study.delivered_at).is_(None),
                                           col(Job.created_at) > col(Study.delivered_at)))))


def _undelivered() -> Any:
    """A result of the study's jobs still in the outbox (a dead letter waits for ``outbox retry|drop``)."""
    return exists().where(col(Job.study_id) == col(Study.id), col(OutboxEntry.job_id) == col(Job.id),
                          col(OutboxEntry.state).in_(UNDELIVERED))


def _arrived_after() -> Any:
    """An instance acknowledged after the delivery: the study is being reopened (the listener commits the
    instance before it reopens the study, so the state may still say finished)."""
    late = aliased(Instance)
    return exists().where(late.study_id == col(Study.id), late.received_at > col(Study.delivered_at))


def _finished() -> list[Any]:
    return [col(Study.purged_at).is_(None), col(Study.state).in_(FINAL_STATES), ~_run_after(), ~_undelivered()]


def _eligible() -> list[Any]:
    return [col(Study.delivered_at).is_not(None), *_finished(), ~_arrived_after()]


def _unused(planned_before: datetime) -> list[Any]:
    """Nothing to deliver and no delivery to count from; a ``ready`` study only with a job, once the
    scheduler no longer plans it again (ready before ``planned_before``)."""
    has_job = exists().where(col(Job.study_id) == col(Study.id))
    return [*_finished(), or_(col(Study.delivered_at).is_(None), _arrived_after()),
            or_(col(Study.state) != "ready", and_(has_job, col(Study.ready_at) <= planned_before))]


def _listed(store: Store, where: list[Any], anchor: Any) -> list[tuple[int, Any, int]]:
    """Study ids matching ``where``, ``anchor`` oldest first, with their stored bytes."""
    with store.db.session() as session:
        rows = session.exec(
            select(Study.id, anchor, func.coalesce(func.sum(Blob.stored_size), 0))
            .join(Instance, col(Instance.study_id) == col(Study.id), isouter=True)
            .join(Blob, col(Blob.id) == col(Instance.blob_id), isouter=True)
            .where(*where).group_by(Study.id, anchor).order_by(anchor)
        ).all()
    return [(int(sid), when, int(size)) for sid, when, size in rows]  # type: ignore[arg-type]


def _candidates(store: Store) -> list[tuple[int, Any, int]]:
    """Delivered, unpurged, finished studies without a run or an instance after that delivery, oldest
    delivery first, with their stored bytes."""
    return _listed(store, _eligible(), col(Study.delivered_at))


def _unused_candidates(store: Store, planned_before: datetime) -> list[tuple[int, Any, int]]:
    """Unpurged finished studies with nothing to deliver, oldest last instance first, with their stored bytes."""
    return _listed(store, _unused(planned_before), col(Study.last_received_at))


def purge(store: Store, *, dry_run: bool = False, wait: bool = True,
          stop: threading.Event | None = None) -> PurgeReport:
    """Apply both policies once. ``wait`` False: skip at once while another purge runs (``skipped``);
    ``stop`` set: stop between two studies. A dry run changes nothing and takes no lock."""
    report = PurgeReport(dry_run=dry_run)
    if dry_run:
        _purge_all(store, report, stop)
        return report
    with exclusive(store.db, wait=wait) as held:
        if held:
            _purge_all(store, report, stop)
        else:
            report.skipped = True
    return report


def _planned_before(store: Store, now: datetime) -> datetime:
    """Ready before this, a study is no longer planned again by the scheduler (its look-back window)."""
    workers = store.settings.workers
    return now - timedelta(seconds=workers.ehr_deadline_seconds + workers.lookback_seconds)


def purge_one(store: Store, study_id: int, *, actor: str, dry_run: bool = False) -> Purged | None:
    """Purge one study now, whatever its age (``msgate db purge --study``): only one the policies could purge
    once old enough (finished, with no run to come and no result to deliver); None for any other. Waits
    for a running purge; audited as ``retention.purge`` with the operator as actor."""
    with nullcontext(True) if dry_run else exclusive(store.db, wait=True):
        purged = _purge_study(store, study_id, dry_run, actor=actor)
        if purged is not None:
            return purged
        with store.db.session() as session:
            study = session.get(Study, study_id)
            seen = study.last_received_at if study is not None else None
        return _purge_unused(store, study_id, dry_run, seen, _planned_before(store, utcnow()), actor=actor)


def _purge_all(store: Store, report: PurgeReport, stop: threading.Event | None) -> None:
    settings, now = store.settings.storage, utcnow()
    unused_days = settings.retention_days if settings.unused_retention_days is None else settings.unused_retention_days
    planned_before = _planned_before(store, now)
    # by free space only where purging frees that space: PostgreSQL blob bodies live on the database's
    # disk, which msgate cannot measure, so measuring MSGATE_HOME purged every delivered study there
    free = free_bytes(store.settings.blob_dir) if settings.blob_backend == "local" else float("inf")
    # unused studies first: under the floor, images msgate has no use for go before delivered ones
    listed = [(sid, when, size, now - timedelta(days=unused_days), True)
              for sid, when, size in _unused_candidates(store, planned_before)]
    listed += [(sid, when, size, now - timedelta(days=settings.retention_days), False)
               for sid, when, size in _candidates(store)]
    for study_id, when, size, cutoff, unused in listed:
        if stop is not None and stop.is_set():
            return
        by_age = when is not None and when <= cutoff
        if not by_age and free >= settings.purge_free_bytes:
            continue
        purged = (_purge_unused(store, study_id, report.dry_run, when, planned_before) if unused
                  else _purge_study(store, study_id, report.dry_run))
        if purged is None:  # changed since the candidates were listed (new instances, a new run)
            continue
        if by_age:
            report.by_age += 1
        else:
            report.by_space += 1
            free += size
        report.unused += int(unused)
        report.studies.append(study_id)
        report.bytes += size
        report.blobs += purged.blobs
        report.engine_texts += purged.engine_texts
    for study_id in _purged_with_texts(store):
        report.engine_texts += _erase_kept_texts(store, study_id, report.dry_run)


@dataclass(frozen=True)
class Purged:
    blobs: int
    engine_texts: int


def _purge_study(store: Store, study_id: int, dry_run: bool, *, actor: str = "retention") -> Purged | None:
    """Purge one delivered study's bodies and engine texts; None when it is no longer eligible, re-checked
    under the study's row lock, so an instance acknowledged since the candidates were listed is never purged."""
    with store.db.session() as session:
        study = session.exec(select(Study).where(Study.id == study_id, *_eligible()).with_for_update()).first()
        if study is None:
            return None
        return _erase_study(store, session, study, dry_run, actor, "delivered",
                            col(Instance.received_at) <= study.delivered_at)


def _purge_unused(store: Store, study_id: int, dry_run: bool, seen: Any, planned_before: datetime, *,
                  actor: str = "retention") -> Purged | None:
    """Purge one unused study; None when it is no longer eligible under its row lock: an instance since the
    listing (``seen``: its last instance then), or one its finished state did not see."""
    with store.db.session() as session:
        study = session.exec(select(Study).where(Study.id == study_id, *_unused(planned_before))
                             .with_for_update()).first()
        if study is None or study.last_received_at != seen or not _decided_after_last(session, study):
            return None
        return _erase_study(store, session, study, dry_run, actor, "unused", col(Instance.study_id) == study_id)


def _decided_after_last(session: Session, study: Study) -> bool:
    """The tracker's latest decision (``study.<state>`` audit event) came after the study's last instance."""
    decided = session.exec(select(AuditEvent.ts).where(
        AuditEvent.subject == f"study:{study.id}", col(AuditEvent.kind).in_(DECISIONS))
        .order_by(col(AuditEvent.seq).desc()).limit(1)).first()
    last = study.last_received_at or study.first_received_at
    return decided is not None and decided >= last


def _erase_study(store: Store, session: Session, study: Study, dry_run: bool, actor: str, policy: str,
                 bodies: Any) -> Purged:
    """Under the study's row lock: delete the unpurged ``bodies`` (a condition on Instance), erase the
    engine texts, mark the study purged and audit it."""
    blobs = session.exec(
        select(Blob).join(Instance, col(Instance.blob_id) == col(Blob.id))
        .where(Instance.study_id == study.id, col(Blob.purged_at).is_(None), bodies)
    ).all()
    texts = _texts_of(session, study.id)  # type: ignore[arg-type]
    if dry_run:
        return Purged(len(blobs), len(texts))
    for blob in blobs:
        store.blobs.purge(session, blob)
    _erase(session, texts)
    study.purged_at = utcnow()
    session.add(study)
    audit.append(session, kind="retention.purge", actor=actor, subject=f"study:{study.id}",
                 detail={"blobs": len(blobs), "engine_texts": len(texts), "attempt_ids": texts, "policy": policy})
    return Purged(len(blobs), len(texts))


def _texts_of(session: Session, study_id: int) -> list[int]:
    """The ids of the study's outbox attempts that still hold the engine's encrypted text."""
    ids = session.exec(
        select(OutboxAttempt.id).join(OutboxEntry, col(OutboxEntry.id) == col(OutboxAttempt.entry_id))
        .join(Job, col(Job.id) == col(OutboxEntry.job_id))
        .where(Job.study_id == study_id, col(OutboxAttempt.peer_text_enc).is_not(None))).all()
    return sorted(i for i in ids if i is not None)


def _erase(session: Session, attempt_ids: list[int]) -> None:
    if attempt_ids:
        session.execute(update(OutboxAttempt).where(col(OutboxAttempt.id).in_(attempt_ids))  # type: ignore[arg-type]
                        .values(peer_text_enc=None))


def _purged_with_texts(store: Store) -> list[int]:
    """Purged studies whose attempts still hold engine text (purged by an msgate that kept it)."""
    with store.db.session() as session:
        return [int(i) for i in session.exec(
            select(Job.study_id).distinct().join(OutboxEntry, col(OutboxEntry.job_id) == col(Job.id))
            .join(OutboxAttempt, col(OutboxAttempt.entry_id) == col(OutboxEntry.id))
            .join(Study, col(Study.id) == col(Job.study_id))
            .where(col(Study.purged_at).is_not(None), col(OutboxAttempt.peer_text_enc).is_not(None))).all()]


def _erase_kept_texts(store: Store, study_id: int, dry_run: bool) -> int:
    with store.db.session() as session:
        study = session.exec(select(Study).where(Study.id == study_id, col(Study.purged_at).is_not(None))
                             .with_for_update()).first()
        texts = _texts_of(session, study_id) if study is not None else []
        if texts and not dry_run:
            _erase(session, texts)
            audit.append(session, kind="retention.erase", actor="retention", subject=f"study:{study_id}",
                         detail={"engine_texts": len(texts), "attempt_ids": texts})
        return len(texts)


@contextmanager
def exclusive(db: Database, *, wait: bool) -> Iterator[bool]:
    """Held by one purge at a time, across processes; yields whether it is held (``wait`` False: False
    at once while another holds it). PostgreSQL: a session advisory lock on a connection of its own, not
    left idle in a transaction while the purge runs. SQLite (one host): an ``flock`` on a file beside the
    database; each study's own ``BEGIN IMMEDIATE`` transaction is too short to guard a whole purge."""
    if db.is_sqlite:
        with _file_lock(db.url, wait=wait) as held:
            yield held
        return
    with db.connect() as conn:
        call = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
        held = conn.execute(text(f"SELECT {call}(:key)"), {"key": PURGE_LOCK}).scalar() is not False
        conn.commit()
        try:
            yield held
        finally:
            if held:
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PURGE_LOCK})
                    conn.commit()
                except Exception:  # a broken connection: the server ended the session, and its lock
                    conn.invalidate()


@contextmanager
def _file_lock(url: str, *, wait: bool) -> Iterator[bool]:
    path = make_url(url).database
    if not path or path == ":memory:":  # a private database: nobody else can purge it
        yield True
        return
    with open(f"{path}-purge.lock", "ab") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
