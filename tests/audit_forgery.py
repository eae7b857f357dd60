"""The audit-chain attacks the tests play: a writer with database access cuts the newest records off, or
edits one record and recomputes every hash after it and the head (keyed with the key ring's audit key,
or plain SHA-256 as the chain was before it was keyed)."""

from __future__ import annotations

import hashlib
import hmac

from sqlalchemy import delete
from sqlmodel import Session, col, select

from msgate.storage import audit
from msgate.storage.models import AuditEvent, AuditHead


def cut(s: Session, keep: int) -> None:
    """Delete every record after ``keep`` and move the head back to it; nothing else changes."""
    s.execute(delete(AuditEvent).where(col(AuditEvent.seq) > keep))
    kept = s.exec(select(AuditEvent).where(AuditEvent.seq == keep)).one()
    head = s.get(AuditHead, 1)
    assert head is not None
    head.seq, head.hash = kept.seq, kept.hash
    s.add(head)


def rewrite(s: Session, from_seq: int, *, key: bytes | None, actor: str = "mallory") -> None:
    """Set record ``from_seq``'s actor and recompute every hash after it and the head: HMAC-SHA256 with
    ``key``, or plain SHA-256 when ``key`` is None."""
    rows = s.exec(select(AuditEvent).where(AuditEvent.seq >= from_seq).order_by(col(AuditEvent.seq))).all()
    prev = rows[0].prev_hash
    rows[0].actor = actor
    for row in rows:
        body = audit.canonical(seq=row.seq, ts=row.ts, kind=row.kind, actor=row.actor, subject=row.subject,
                               detail=row.detail)
        link = prev.encode() + b"|" + body
        row.prev_hash = prev
        row.hash = prev = (hmac.new(key, link, hashlib.sha256) if key is not None else hashlib.sha256(link)).hexdigest()
        s.add(row)
    head = s.get(AuditHead, 1)
    assert head is not None
    head.hash = prev
    s.add(head)
