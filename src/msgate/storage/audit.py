"""Append-only, hash-chained audit log of ingests, decryptions, sends, operator actions and key events.

``hash_n = HMAC-SHA256(K, hash_{n-1} | canonical JSON of event n)``, K derived (HKDF) from the key ring's
blind-index key, which the database never holds: someone with write access to the database can still
edit a record, but no longer recompute the hashes after it (an unkeyed SHA-256 chain let them, and
:func:`verify` then passed). The keyed part starts at record 1 of a chain this code created (record 1
links to :func:`keyed_genesis` instead of zeros) or, in a database written before, at the one
``audit.keyed`` record migration 0007 appends (:func:`key_chain`); the records before it stay
``sha256(hash_{n-1} | event)`` and are verified as such. The key is bound to each engine
(:func:`use_key`, from ``open_store``), so callers of :func:`append` pass no key, and a process that
opens two stores hashes each with its own.

The chain tip lives in ``audit_head``, locked by each append (``SELECT ... FOR UPDATE``; SQLite
serialises writers anyway), so concurrent writers cannot fork the chain. :func:`verify` names the
first record that was edited, deleted or reordered, and notices a deleted tail through the head; a
deleted tail that also moved the head back is seen against the head recorded outside the database
(:mod:`msgate.storage.audit_anchor`). Details hold internal ids only, never PHI.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import pwd
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from weakref import WeakKeyDictionary

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import func, insert
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from msgate.errors import ConfigError
from msgate.storage.models import AuditEvent, AuditHead, utcnow

log = logging.getLogger(__name__)

GENESIS = "0" * 64
MARKER = "audit.keyed"  # the record from which an older chain is keyed
SCHEME = "hmac-sha256/v1"
_HKDF_INFO = b"msgate audit chain v1"


class AuditKeyMissing(ConfigError):
    """An append to a keyed chain by a process that has no audit key: it would write an unkeyed record."""

    code = "audit_key_missing"


def chain_key(index_key: bytes) -> bytes:
    """The audit key: HKDF-SHA256 of the key ring's blind-index key (never rotated, in every process that
    opens the store), so the key ring format is unchanged and the key is never stored in the database."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(index_key)


def keyed_genesis(key: bytes) -> str:
    """What record 1 of a chain keyed from its start links to: not the zeros of an unkeyed chain, and
    made with the key, so a chain keyed with another key ring is named as such by :func:`verify`."""
    return hmac.new(key, b"genesis", hashlib.sha256).hexdigest()


def canonical(*, seq: int, ts: datetime, kind: str, actor: str, subject: str, detail: dict[str, Any]) -> bytes:
    doc = {"seq": seq, "ts": ts.astimezone(UTC).isoformat(timespec="microseconds"), "kind": kind,
           "actor": actor, "subject": subject, "detail": detail}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()


def chain_hash(prev_hash: str, body: bytes, key: bytes | None = None) -> str:
    """SHA-256 (``key`` None: records from before the chain was keyed) or HMAC-SHA256 under ``key``."""
    message = prev_hash.encode() + b"|" + body
    if key is None:
        return hashlib.sha256(message).hexdigest()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


@dataclass
class _Chain:
    """What one engine's appends need: its audit key, and where the keyed part starts once seen."""

    key: bytes | None = None
    keyed_from: int | None = None  # cached once found: a keyed chain stays keyed
    warned: bool = False


_CHAINS: WeakKeyDictionary[Engine, _Chain] = WeakKeyDictionary()
_CHAINS_LOCK = threading.Lock()


def use_key(engine: Engine, key: bytes) -> None:
    """Bind the audit key (:func:`chain_key`) to ``engine``: every session on it appends keyed records."""
    with _CHAINS_LOCK:
        _CHAINS[engine] = _Chain(key=key)


def key_of(engine: Engine) -> bytes | None:
    """The audit key bound to ``engine`` (:func:`use_key`), if any."""
    with _CHAINS_LOCK:
        chain = _CHAINS.get(engine)
    return chain.key if chain is not None else None


def _chain(session: Session) -> _Chain:
    bind = session.get_bind()
    engine = getattr(bind, "engine", bind)  # a session bound to a connection
    with _CHAINS_LOCK:
        chain = _CHAINS.get(engine)
        if chain is None:
            chain = _CHAINS[engine] = _Chain()
        return chain


def keyed_start(session: Session) -> int | None:
    """The seq from which the committed chain is keyed, or None when no record is keyed (an empty chain,
    one written before this release, or one whose keyed part was removed). Needs no key."""
    first = session.exec(select(AuditEvent.prev_hash).where(AuditEvent.seq == 1)).first()
    if first is not None and first != GENESIS:
        return 1
    found = session.exec(select(func.min(AuditEvent.seq)).where(AuditEvent.kind == MARKER)).one()
    return int(found) if found is not None else None


def _link(session: Session, head: AuditHead) -> tuple[bytes | None, str]:
    """The key of the next record (None: SHA-256) and what it links to; called under the head lock.

    Where the keyed part starts is looked up once per engine, then cached: a keyed chain stays keyed. An
    unkeyed chain that is not empty (written before this release, no serve started since) stays SHA-256
    until migration 0007 keys it, and is looked up again at each append until then (under the head
    lock, so the first append after :func:`key_chain` commits is keyed)."""
    chain = _chain(session)
    if head.seq == 0:  # empty: keyed from its first record on when this process holds the key
        return (chain.key, keyed_genesis(chain.key)) if chain.key is not None else (None, head.hash)
    if chain.keyed_from is None:
        chain.keyed_from = keyed_start(session)
        if chain.keyed_from is None:
            if chain.key is not None and not chain.warned:
                chain.warned = True
                log.warning("audit chain is not keyed yet: the next msgate serve start keys it",
                            extra={"seq": head.seq})
            return None, head.hash
    if chain.key is None:
        raise AuditKeyMissing(f"the audit chain is keyed from seq {chain.keyed_from}: appending needs the audit "
                              "key (open the store with its key ring)")
    return chain.key, head.hash


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
    key, prev = _link(session, head)
    return _add(session, head, key, prev, kind=kind, actor=actor, subject=subject,
                detail=json.loads(json.dumps(detail or {}, default=str)))


def _add(session: Session, head: AuditHead, key: bytes | None, prev: str, *, kind: str, actor: str, subject: str,
         detail: dict[str, Any]) -> AuditEvent:
    ts, seq = utcnow(), head.seq + 1
    digest = chain_hash(prev, canonical(seq=seq, ts=ts, kind=kind, actor=actor, subject=subject, detail=detail), key)
    event = AuditEvent(seq=seq, ts=ts, kind=kind, actor=actor, subject=subject, detail=detail,
                       prev_hash=prev, hash=digest)
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
    key, prev = _link(session, head)
    seq, rows = head.seq, []
    for kind, actor, subject, detail in events:
        seq, ts = seq + 1, utcnow()
        payload = detail if _plain(detail) else json.loads(json.dumps(detail, default=str))
        digest = chain_hash(prev, canonical(seq=seq, ts=ts, kind=kind, actor=actor, subject=subject, detail=payload),
                            key)
        rows.append({"seq": seq, "ts": ts, "kind": kind, "actor": actor, "subject": subject, "detail": payload,
                     "prev_hash": prev, "hash": digest})
        prev = digest
    session.connection().execute(insert(AuditEvent.__table__), rows)  # type: ignore[arg-type]
    head.seq, head.hash = seq, prev
    session.add(head)


def key_chain(session: Session, key: bytes) -> int | None:
    """Migration 0007: key a chain written before it by appending its ``audit.keyed`` record (HMAC, as is
    every record after it). Idempotent; returns where the keyed part starts, None for an empty chain (its
    first record is keyed). It runs once, in the upgrade's transaction: a database past that revision
    whose keyed part was removed is never keyed again, so :func:`verify` keeps failing."""
    head = session.exec(select(AuditHead).where(AuditHead.id == 1).with_for_update()).one()
    if head.seq == 0:
        return None
    found = keyed_start(session)
    if found is not None:
        return found
    seq = head.seq + 1
    _add(session, head, key, head.hash, kind=MARKER, actor="migrate", subject="audit",
         detail={"scheme": SCHEME, "from_seq": seq})
    log.warning("audit chain keyed from this record on; the records before it stay SHA-256. Once per database: "
                "another time means its keyed part was removed", extra={"seq": seq})
    return seq


@dataclass(frozen=True)
class Head:
    """The chain's tip, and where its keyed part starts: what ``msgate audit head`` exports."""

    seq: int
    hash: str
    keyed_from: int | None


def current_head(session: Session, seq: int | None = None) -> Head | None:
    """The tip, or with ``seq`` that record (None when there is none), to compare with a head shipped
    earlier: the same seq must still have the same hash."""
    if seq is None:
        head = session.get(AuditHead, 1)
        found = (head.seq, head.hash) if head is not None else (0, GENESIS)
    else:
        row = session.exec(select(AuditEvent.hash).where(AuditEvent.seq == seq)).first()
        if row is None:
            return None
        found = (seq, row)
    return Head(found[0], found[1], keyed_start(session))


@dataclass(frozen=True)
class Verification:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str = ""
    keyed_from: int | None = None


class _Walk:
    """The state of :func:`verify` between records: SHA-256 up to the keyed start, HMAC from it on."""

    def __init__(self, key: bytes | None) -> None:
        self.key, self.prev, self.expected, self.checked = key, GENESIS, 1, 0
        self.keyed_from: int | None = None

    def step(self, event: AuditEvent) -> tuple[int, str] | None:
        """Check one record; (its seq, why) when it is not what the chain says."""
        if event.seq != self.expected:
            return self.expected, f"record {self.expected} is missing (next is {event.seq})"
        problem = self._keyed_start(event)
        if problem:
            return event.seq, problem
        if event.prev_hash != self.prev:
            return event.seq, f"record {event.seq} does not link to its predecessor (deleted or reordered)"
        key = self.key if self.keyed_from is not None else None
        body = canonical(seq=event.seq, ts=event.ts, kind=event.kind, actor=event.actor, subject=event.subject,
                         detail=event.detail)
        if chain_hash(self.prev, body, key) != event.hash:
            how = " under this key ring's audit key" if key is not None else ""
            return event.seq, f"record {event.seq} was altered (its hash does not match its content{how})"
        self.prev, self.expected, self.checked = event.hash, event.seq + 1, self.checked + 1
        return None

    def _keyed_start(self, event: AuditEvent) -> str:
        """Notes where the keyed part starts (record 1 linked to the keyed genesis, or the ``audit.keyed``
        record); a reason when it cannot be checked."""
        if self.keyed_from is not None or not (event.kind == MARKER or (event.seq == 1 and event.prev_hash != GENESIS)):
            return ""
        if self.key is None:
            return f"the chain is keyed from record {event.seq}: verifying it needs the key ring"
        if event.kind == MARKER and event.detail.get("scheme") != SCHEME:
            return f"record {event.seq} keys the chain with a scheme this msgate does not know"
        if event.kind != MARKER:
            if event.prev_hash != keyed_genesis(self.key):
                return ("record 1 links to neither the start of an unkeyed chain nor this key ring's keyed start "
                        "(edited, or keyed with another key ring)")
            self.prev = event.prev_hash
        self.keyed_from = event.seq
        return ""


def verify(session: Session, batch: int = 5000) -> Verification:
    """Walk the chain in order up to the head read first; stop at the first inconsistency.

    The head is read before the records: records appended while the walk runs (committed after that
    read) are not part of what is verified. Reading it last made a concurrent append on PostgreSQL
    (read committed: each page sees what has committed by then) look like a deleted tail.

    With the audit key (a store opened with its key ring), a chain with records none of which is keyed
    fails: every database this code created or migrated has a keyed part, so its absence means it was
    removed and the chain rehashed without the key (or a migrated database no serve has started on yet)."""
    key = _chain(session).key
    head = session.get(AuditHead, 1)
    end = head.seq if head is not None else None
    walk = _Walk(key)
    last_seq = 0
    while True:
        query = select(AuditEvent).where(AuditEvent.seq > last_seq)
        if end is not None:
            query = query.where(AuditEvent.seq <= end)
        rows: Sequence[AuditEvent] = session.exec(query.order_by(col(AuditEvent.seq)).limit(batch)).all()
        if not rows:
            break
        for event in rows:
            bad = walk.step(event)
            if bad:
                return Verification(False, walk.checked, bad[0], bad[1], walk.keyed_from)
            last_seq = event.seq
    return _ending(head, walk)


def _ending(head: AuditHead | None, walk: _Walk) -> Verification:
    """What the head and the keyed start say once every record checked out."""
    if head is not None and (head.seq != walk.expected - 1 or head.hash != walk.prev):
        return Verification(False, walk.checked, walk.expected, f"records after seq {walk.expected - 1} were "
                            f"deleted (head says {head.seq})", walk.keyed_from)
    if walk.keyed_from is None and walk.key is not None:
        if walk.checked == 0:
            return Verification(True, 0, keyed_from=1)  # its first record will be keyed
        return Verification(False, walk.checked, None, f"none of the {walk.checked} records is keyed: its keyed "
                            "part was removed and the chain rehashed without the audit key, or no msgate serve "
                            "has started since this database was migrated (compare with the exported head)")
    return Verification(True, walk.checked, keyed_from=walk.keyed_from)


def tail(session: Session, limit: int = 20, kind: str | None = None) -> list[AuditEvent]:
    query = select(AuditEvent).order_by(col(AuditEvent.seq).desc()).limit(limit)
    if kind:
        query = query.where(col(AuditEvent.kind).startswith(kind))
    return list(reversed(session.exec(query).all()))
