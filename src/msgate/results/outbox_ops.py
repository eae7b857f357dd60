"""Operator views and actions on the results outbox (``msgate outbox list|show|retry|drop``, ``msgate trace``).

Every action is recorded as an attempt row (``requeued``/``dropped``) and audited with the operator's
name; a retry restarts the entry's max-age window (see :mod:`msgate.results.outbox`) and is refused for
an entry whose result was superseded by a queued correction.

An attempt's peer text (the engine's MSA-3/ERR-8 explanation, encrypted) is decrypted only by
:func:`peer_texts` for ``outbox show``, which audits it; the summaries say only whether there is one.
Retention erases it with the study's images (:mod:`msgate.storage.retention`); :func:`erased_texts` names
the attempts whose text it erased, from its audit events.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from msgate.results.outbox import PEER_TEXT_COLUMN, _mark_study, superseded
from msgate.storage import audit
from msgate.storage.models import AuditEvent, Job, OutboxAttempt, OutboxEntry, utcnow
from msgate.storage.retention import TEXT_EVENTS
from msgate.storage.store import Store

log = logging.getLogger(__name__)


def entries(session: Session, *, state: str | None = None, job_id: str | None = None,
            limit: int = 200) -> list[OutboxEntry]:
    query = select(OutboxEntry).order_by(col(OutboxEntry.created_at).desc()).limit(limit)
    if state:
        query = query.where(OutboxEntry.state == state)
    if job_id:
        query = query.where(OutboxEntry.job_id == job_id)
    return list(session.exec(query).all())


def attempts_of(session: Session, entry_id: str) -> list[OutboxAttempt]:
    return list(session.exec(select(OutboxAttempt).where(OutboxAttempt.entry_id == entry_id)
                             .order_by(col(OutboxAttempt.started_at), col(OutboxAttempt.id))).all())


def requeue(store: Store, entry_ids: Sequence[str], *, actor: str) -> list[str]:
    """Operator retry: dead or pending entries become due now; their max-age window restarts.

    An entry of a job superseded by a later one that queued results (a correction) is refused: sent now,
    it would leave the EHR or the PACS on the out-of-date result (``retry --dead`` used to resend it).
    """
    done = []
    with store.db.session() as session:
        stale = superseded(session, session.exec(select(OutboxEntry.job_id)
                                                 .where(col(OutboxEntry.id).in_(list(entry_ids)))).all())
        for entry_id in entry_ids:
            entry = session.get(OutboxEntry, entry_id)
            if entry is None or entry.state not in ("dead", "pending"):
                continue
            if entry.job_id in stale:
                log.warning("outbox entry not requeued: its result was superseded",
                            extra={"outbox_id": entry.id, "job_id": entry.job_id})
                continue
            entry.state, entry.next_attempt_at = "pending", utcnow()
            session.add(entry)
            session.add(OutboxAttempt(entry_id=entry.id, outcome="requeued", detail=f"by {actor}"[:512]))
            audit.append(session, kind="outbox.retry", actor=actor, subject=f"outbox:{entry.id}",
                         detail={"job_id": entry.job_id, "destination": entry.destination})
            done.append(entry.id)
    return done


def in_flight(entry: OutboxEntry, now: datetime) -> bool:
    """A sender holds the entry right now: ``sending`` under a lease that has not run out."""
    return entry.state == "sending" and entry.next_attempt_at > now


def drop(store: Store, entry_ids: Sequence[str], *, actor: str) -> list[str]:
    """Operator drop: the entry is never sent; it no longer holds back the study's delivered mark.

    Delivered and dropped entries are skipped, and so are entries in flight: the peer may already have
    the object, and its answer must still be recorded. An expired lease means the sender stopped; that
    entry can be dropped.
    """
    done = []
    now = utcnow()
    with store.db.session() as session:
        for entry_id in entry_ids:
            # the row lock orders this against a sender's renew/record of the same entry
            query = select(OutboxEntry).where(OutboxEntry.id == entry_id).with_for_update()
            entry = session.exec(query).first()
            if entry is None or entry.state in ("delivered", "dropped") or in_flight(entry, now):
                continue
            entry.state = "dropped"
            session.add(entry)
            session.add(OutboxAttempt(entry_id=entry.id, outcome="dropped", detail=f"by {actor}"[:512]))
            audit.append(session, kind="outbox.drop", actor=actor, subject=f"outbox:{entry.id}",
                         detail={"job_id": entry.job_id, "destination": entry.destination})
            session.flush()
            _mark_study(session, entry, now)
            done.append(entry.id)
    return done


def summary(entry: OutboxEntry, attempts: Sequence[OutboxAttempt], blob_kind: str = "") -> dict[str, Any]:
    return {
        "id": entry.id, "job_id": entry.job_id, "kind": entry.kind, "object": blob_kind.removeprefix("out."),
        "destination": entry.destination, "state": entry.state, "attempts": entry.attempts,
        "next_attempt_at": entry.next_attempt_at, "created_at": entry.created_at,
        "delivered_at": entry.delivered_at, "last_error": entry.last_error,
        "history": [{"at": a.started_at, "outcome": a.outcome, "peer_status": a.peer_status, "detail": a.detail,
                     "has_peer_text": a.peer_text_enc is not None}
                    for a in attempts],
    }


def peer_texts(store: Store, attempts: Sequence[OutboxAttempt]) -> dict[int, str]:
    """Attempt id -> the peer's free-text explanation, decrypted (it may name the patient: the caller
    audits the display as ``phi.view``)."""
    out: dict[int, str] = {}
    for attempt in attempts:
        text = store.cipher.decrypt(attempt.peer_text_enc, column=PEER_TEXT_COLUMN)
        if text is not None and attempt.id is not None:
            out[attempt.id] = text
    return out


def erased_texts(session: Session, entry: OutboxEntry, attempts: Sequence[OutboxAttempt]) -> set[int]:
    """Ids of the attempts whose engine text retention erased: the ``attempt_ids`` of the retention audit
    events of the entry's study (no text now says nothing of whether the engine sent one)."""
    if entry.job_id is None or all(a.peer_text_enc is not None for a in attempts):
        return set()
    study_id = session.exec(select(Job.study_id).where(Job.id == entry.job_id)).first()
    if study_id is None:
        return set()
    details = session.exec(select(AuditEvent.detail).where(AuditEvent.subject == f"study:{study_id}",
                                                           col(AuditEvent.kind).in_(TEXT_EVENTS))).all()
    named = {int(i) for detail in details for i in (detail or {}).get("attempt_ids", [])}
    return {a.id for a in attempts if a.id is not None and a.id in named and a.peer_text_enc is None}
