"""Append-only, hash-chained audit log of ingests, decryptions, sends, operator actions and key events.

``hash_n = sha256(hash_{n-1} | canonical JSON of event n)``. The chain tip lives in ``audit_head``,
locked by each append (``SELECT ... FOR UPDATE``; SQLite serialises writers anyway), so concurrent
writers cannot fork the chain. :func:`verify` names the first record that was edited, deleted or
reordered, and notices a deleted tail through the head. Details hold internal ids only, never PHI.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert
from sqlmodel import Session, col, select

from msgate.storage.models import AuditEvent, AuditHead, utcnow

GENESIS = "0" * 64


def canonical(*, seq: int, ts: datetime, kind: str, actor: str, subject: str, detail: dict[str, Any]) -> bytes:
    doc = {"seq": seq, "ts": ts.astimezone(UTC).isoformat(timespec="microseconds"), "kind": kind,
           "actor": actor, "subject": subject, "detail": detail}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()


def chain_hash(prev_hash: str, body: bytes) -> str:
    return hashlib.sha256(prev_hash.encode() + b"|" + body).hexdigest()


def operator() -> str:
    """The actor name for CLI actions: the effective OS account running the command, and under sudo the
    account that invoked it (``cli:msgate (sudo alice)``), within the 64-character actor column.

    It was ``getpass.getuser()``, which reads $LOGNAME/$USER first: any operator could record someone
    else's name, and under ``sudo -u msgate`` every view read ``cli:msgate``. The uid cannot be set from
    the environment; SUDO_USER only adds the invoking name to it, never replaces it."""
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:  # a container uid without a passwd entry
        name = f"uid{uid}"
    actor = f"cli:{name}"
    invoker = os.environ.get("SUDO_USER", "").strip()
    if invoker and invoker != name:
        room = 64 - len(actor) - len(" (sudo )")  # AuditEvent.actor is 64 characters
        if room > 0:
            actor += f" (sudo {invoker[:room]})"
    return actor[:64]


def append(session: Session, *, kind: str, actor: str, subject: str = "",
           detail: dict[str, Any] | None = None) -> AuditEvent:
    """Add one event to the chain inside the caller's transaction."""
    head = session.exec(select(AuditHead).where(AuditHead.id == 1).with_for_update()).one()
    ts = utcnow()
    seq = head.seq + 1
    payload = json.loads(json.dumps(detail or {}, default=str))
    digest = chain_hash(head.hash, canonical(seq=seq, ts=ts, kind=kind, actor=actor, subject=subject, detail=payload))
    event = AuditEvent(seq=seq, ts=ts, kind=kind, actor=actor, subject=subject, detail=payload,
                       prev_hash=head.hash, hash=digest)
    head.seq, head.hash = seq, digest
    session.add(event)
    session.add(head)
    return event


def _plain(detail: dict[str, Any]) -> bool:
    """True when the detail is already what JSON gives back (flat str/int/bool/None values)."""
    return all(isinstance(k, str) and (v is None or type(v) in (str, int, bool)) for k, v in detail.items())


def append_many(session: Session, events: Sequence[tuple[str, str, str, dict[str, Any]]]) -> None:
    """Add several events (kind, actor, subject, detail) to the chain with one head update, in order."""
    if not events:
        return
    head = session.exec(select(AuditHead).where(AuditHead.id == 1).with_for_update()).one()
    seq, prev, rows = head.seq, head.hash, []
    for kind, actor, subject, detail in events:
        seq, ts = seq + 1, utcnow()
        payload = detail if _plain(detail) else json.loads(json.dumps(detail, default=str))
        digest = chain_hash(prev, canonical(seq=seq, ts=ts, kind=kind, actor=actor, subject=subject, detail=payload))
        rows.append({"seq": seq, "ts": ts, "kind": kind, "actor": actor, "subject": subject, "detail": payload,
                     "prev_hash": prev, "hash": digest})
        prev = digest
    session.connection().execute(insert(AuditEvent.__table__), rows)  # type: ignore[arg-type]
    head.seq, head.hash = seq, prev
    session.add(head)


@dataclass(frozen=True)
class Verification:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str = ""


def verify(session: Session, batch: int = 5000) -> Verification:
    """Walk the chain in order up to the head read first; stop at the first inconsistency.

    The head is read before the records: records appended while the walk runs (committed after that
    read) are not part of what is verified. Reading it last made a concurrent append on PostgreSQL
    (read committed: each page sees what has committed by then) look like a deleted tail."""
    head = session.get(AuditHead, 1)
    end = head.seq if head is not None else None
    prev_hash, expected_seq, checked = GENESIS, 1, 0
    last_seq = 0
    while True:
        query = select(AuditEvent).where(AuditEvent.seq > last_seq)
        if end is not None:
            query = query.where(AuditEvent.seq <= end)
        rows: Sequence[AuditEvent] = session.exec(query.order_by(col(AuditEvent.seq)).limit(batch)).all()
        if not rows:
            break
        for event in rows:
            problem = _check(event, expected_seq, prev_hash)
            if problem:
                return Verification(False, checked, event.seq if "missing" not in problem else expected_seq, problem)
            prev_hash, expected_seq, checked, last_seq = event.hash, event.seq + 1, checked + 1, event.seq
    if head is not None and (head.seq != expected_seq - 1 or head.hash != prev_hash):
        return Verification(False, checked, expected_seq, f"records after seq {expected_seq - 1} were deleted "
                            f"(head says {head.seq})")
    return Verification(True, checked)


def _check(event: AuditEvent, expected_seq: int, prev_hash: str) -> str:
    if event.seq != expected_seq:
        return f"record {expected_seq} is missing (next is {event.seq})"
    if event.prev_hash != prev_hash:
        return f"record {event.seq} does not link to its predecessor (deleted or reordered)"
    body = canonical(seq=event.seq, ts=event.ts, kind=event.kind, actor=event.actor, subject=event.subject,
                     detail=event.detail)
    if chain_hash(prev_hash, body) != event.hash:
        return f"record {event.seq} was altered (its hash does not match its content)"
    return ""


def tail(session: Session, limit: int = 20, kind: str | None = None) -> list[AuditEvent]:
    query = select(AuditEvent).order_by(col(AuditEvent.seq).desc()).limit(limit)
    if kind:
        query = query.where(col(AuditEvent.kind).startswith(kind))
    return list(reversed(session.exec(query).all()))
