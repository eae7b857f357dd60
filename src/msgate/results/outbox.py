"""The durable results outbox and its sender loop (role ``publish``: ``run(store, stop)``).

An entry is one rendered object (encrypted blob) for one destination: ``dicom`` to a PACS named in
``MSGATE_PACS`` or ``hl7`` to ``MSGATE_HL7_OUT``. States::

    pending --claim--> sending --peer success--> delivered
                          |----transient failure--> pending (attempts + 1, next_attempt_at = backoff)
                          |----permanent failure or max age--> dead       (operator: retry | drop)
                          |----not sent or no success, job superseded--> dropped (``superseded``)

- A claim is a lease: ``sending`` with ``next_attempt_at`` = lease end. A sender killed mid-send leaves
  the lease to expire; the next sender takes the entry again (an ``interrupted`` attempt is recorded)
  and resends it. Resends reuse the SOP Instance UID, so the PACS keeps one copy. A sender renews an
  entry's lease just before sending it, and only while the lease is still its own (the lease end is
  the claim's token): an entry that waited in a long batch past its lease and was taken by another
  sender is skipped, not sent twice, and an outcome is recorded only by the claim that holds it.
- Success is only the peer's answer: C-STORE ``0x0000``/warning, or MSA-1 ``AA``/``CA``.
- Backoff is exponential with "equal jitter": ``cap = min(max_delay, base * 2**(n-1))``, the delay is
  uniform in ``[cap/2, cap]``. After ``max_age`` since creation (or since the last operator retry) a
  failing entry is dead-lettered; ``AR``/``CR`` and permanent DIMSE statuses dead-letter at once.
- An entry of a superseded result (:mod:`msgate.results.supersede`) is never sent again: dropped at
  renewal, when an answer that is not a success is recorded, or at the next claim; an operator retry
  refuses it. HL7 control ids: :mod:`msgate.results.control_ids` (same MSH-10 for a resend after no
  answer); the MSH-10 sent is recorded on the attempt row.
- Every attempt is an :class:`OutboxAttempt` row, a ``send.attempt`` audit event and a count in
  ``msgate_outbox_deliveries_total`` (kind, outcome). When every entry of
  a study's jobs is delivered (or dropped), ``Study.delivered_at`` is set (retention starts from it).
- The role runs one lane (thread) per destination, so a slow or unreachable peer delays no other;
  each round of a lane sends its due objects over one association (or one MLLP connection).
"""

from __future__ import annotations

import logging
import random
import threading
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from msgate import metrics
from msgate.config import Settings
from msgate.errors import Transient
from msgate.results.supersede import retire, superseded
from msgate.storage import audit
from msgate.storage.models import OUTBOX_OPEN_STATES, Blob, Job, OutboxAttempt, OutboxEntry, Study, utcnow
from msgate.storage.store import Store

log = logging.getLogger(__name__)
ACTOR = "outbox"
HL7_DESTINATION = "hl7"
KIND_ORDER = {"out.seg": 0, "out.pm": 1, "out.sc": 2, "out.sr": 3, "out.oru": 4}
OPEN_STATES = OUTBOX_OPEN_STATES


@dataclass(frozen=True)
class Policy:
    """Retry policy; ``MSGATE_RESULTS__*`` when the settings have a ``results`` section."""

    base_delay: float = 5.0
    max_delay: float = 3600.0
    max_age: float = 3 * 24 * 3600.0
    lease: float = 300.0
    batch: int = 50
    poll: float = 1.0
    dimse_timeout: float = 60.0
    hl7_timeout: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        section = getattr(settings, "results", None)
        if section is None:
            return cls()
        names = cls.__dataclass_fields__.keys()
        return cls(**{name: getattr(section, name) for name in names if hasattr(section, name)})


def backoff(attempts: int, policy: Policy, rng: random.Random | None = None) -> float:
    cap = min(policy.max_delay, policy.base_delay * 2 ** max(0, attempts - 1))
    return cap / 2 + (rng or random).uniform(0, cap / 2)


@dataclass(frozen=True)
class Attempt:
    """What one send gave: ``delivered``, ``retry`` or ``dead``, with the peer's answer.

    ``detail`` is plaintext (no PHI: ids and coded values); ``peer_text`` is the peer's free-text
    explanation (an engine's MSA-3 and ERR-8 can name the patient), stored encrypted by :func:`record`."""

    outcome: str
    peer_status: str = ""
    detail: str = ""
    peer_text: str = field(default="", repr=False)


# --- enqueue --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    kind: str  # blob kind: out.sr, out.seg, out.pm, out.sc, out.oru
    data: bytes


def enqueue(store: Store, session: Session, *, job_id: str, objects: Sequence[Rendered],
            pacs: Sequence[str] | None = None) -> list[OutboxEntry]:
    """Encrypt each object once and add one entry per destination, inside the caller's transaction: the
    ORU to the interface engine, DICOM objects to every PACS, or to the ``pacs`` named."""
    settings = store.settings
    entries = []
    for obj in objects:
        destinations = ([HL7_DESTINATION] if obj.kind == "out.oru"
                        else list(pacs) if pacs is not None else [d.name for d in settings.pacs])
        if obj.kind == "out.oru" and settings.hl7_out is None:
            destinations = []
        if not destinations:
            continue
        blob = store.blobs.put(session, kind=obj.kind, source=obj.data)
        session.flush()
        for dest in destinations:
            entry = OutboxEntry(job_id=job_id, kind="hl7" if obj.kind == "out.oru" else "dicom",
                                destination=dest[:64], blob_id=blob.id)
            session.add(entry)
            entries.append(entry)
    session.flush()
    for entry in entries:
        audit.append(session, kind="outbox.enqueued", actor=ACTOR, subject=f"outbox:{entry.id}",
                     detail={"job_id": job_id, "destination": entry.destination, "kind": entry.kind,
                             "blob_id": entry.blob_id})
    return entries


# --- claim and record -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    id: str
    job_id: str | None
    kind: str
    destination: str
    blob_id: str
    blob_kind: str
    attempts: int
    created_at: datetime
    lease_until: datetime | None = None  # the claim's token: the lease end it set


def _holds(entry: OutboxEntry, claimed: Claimed) -> bool:
    """The entry is still under this claim (no other sender took it after its lease ran out)."""
    if entry.state != "sending":
        return False
    if claimed.lease_until is None:
        return True
    return abs((entry.next_attempt_at - claimed.lease_until).total_seconds()) < 1e-3


_renewed = threading.local()  # per delivering thread: entry id -> its claim as last renewed


def renew(store: Store, claimed: Claimed, policy: Policy, *, now: datetime | None = None) -> Claimed | None:
    """Extend the lease of an entry about to be sent; None if the claim lost it, or if its result was
    superseded meanwhile (then it is dropped): do not send."""
    until = (now or utcnow()) + timedelta(seconds=policy.lease)
    with store.db.session() as session:
        entry = session.exec(select(OutboxEntry).where(OutboxEntry.id == claimed.id).with_for_update()).first()
        if entry is None or not _holds(entry, claimed):
            log.warning("outbox entry no longer held by this sender (taken by another, or dropped); not sent",
                        extra={"outbox_id": claimed.id, "destination": claimed.destination})
            return None
        if superseded(session, [entry.job_id]):  # a correction was queued after the claim: not sent
            retire(session, entry, actor=ACTOR)
            _mark_study(session, entry, now or utcnow())
            log.info("outbox entry superseded by a later result; not sent",
                     extra={"outbox_id": claimed.id, "destination": claimed.destination})
            return None
        entry.next_attempt_at = until
        session.add(entry)
    out = replace(claimed, lease_until=until)
    held = getattr(_renewed, "claims", None)
    if held is not None:
        held[claimed.id] = out
    return out


def claim(store: Store, policy: Policy, *, now: datetime | None = None, destination: str | None = None,
          exclude: Sequence[str] = ()) -> list[Claimed]:
    """Take due entries (pending, or sending with an expired lease) under a lease."""
    now = now or utcnow()
    query = (select(OutboxEntry, Blob.kind).join(Blob, col(Blob.id) == col(OutboxEntry.blob_id))
             .where(col(OutboxEntry.state).in_(("pending", "sending")), col(OutboxEntry.next_attempt_at) <= now))
    if destination is not None:
        query = query.where(OutboxEntry.destination == destination)
    if exclude:
        query = query.where(col(OutboxEntry.destination).not_in(list(exclude)))
    counted: list[tuple[str, str]] = []
    with store.db.session() as session:
        rows = session.exec(
            query.order_by(col(OutboxEntry.next_attempt_at)).limit(policy.batch)
            .with_for_update(of=OutboxEntry, skip_locked=True)  # PostgreSQL: senders share the work
        ).all()
        stale = superseded(session, [entry.job_id for entry, _ in rows])
        out = []
        until = now + timedelta(seconds=policy.lease)
        for entry, blob_kind in rows:
            if entry.state == "sending":
                entry.attempts += 1  # an attempt that never reported (the sender died or hung)
                expired = now - _window_start(session, entry) > timedelta(seconds=policy.max_age)
                if expired and entry.job_id not in stale:
                    entry.state, entry.last_error = "dead", "max age reached; the sender stopped mid-send"
                    session.add(entry)
                    _attempt(session, entry, Attempt("expired", "", entry.last_error))
                    counted.append((entry.kind, "expired"))
                    continue
                _attempt(session, entry, Attempt("interrupted", "", "lease expired: the sender stopped mid-send"))
                counted.append((entry.kind, "interrupted"))
            if entry.job_id in stale:  # a correction is queued: this out-of-date object must not go out now
                retire(session, entry, actor=ACTOR)
                _mark_study(session, entry, now)
                continue
            entry.state, entry.next_attempt_at = "sending", until
            session.add(entry)
            out.append(Claimed(entry.id, entry.job_id, entry.kind, entry.destination, entry.blob_id, blob_kind,
                               entry.attempts, entry.created_at, until))
    for kind, outcome in counted:
        metrics.DELIVERIES.labels(kind=kind, outcome=outcome).inc()
    return out


PEER_TEXT_COLUMN = "outbox_attempt.peer_text"  # the field cipher's associated data for peer_text_enc


def _attempt(session: Session, entry: OutboxEntry, result: Attempt, peer_text_enc: bytes | None = None) -> None:
    session.add(OutboxAttempt(entry_id=entry.id, outcome=result.outcome[:16], peer_status=result.peer_status[:64],
                              detail=result.detail[:512], peer_text_enc=peer_text_enc))
    audit.append(session, kind="send.attempt", actor=ACTOR, subject=f"outbox:{entry.id}",
                 detail={"job_id": entry.job_id, "destination": entry.destination, "kind": entry.kind,
                         "attempt": entry.attempts, "outcome": result.outcome, "peer_status": result.peer_status})


def _window_start(session: Session, entry: OutboxEntry) -> datetime:
    requeued = session.exec(select(OutboxAttempt.started_at).where(OutboxAttempt.entry_id == entry.id,
                                                                   OutboxAttempt.outcome == "requeued")
                            .order_by(col(OutboxAttempt.started_at).desc())).first()
    return max(entry.created_at, requeued) if requeued else entry.created_at


def record(store: Store, claimed: Claimed, result: Attempt, policy: Policy, *, now: datetime | None = None) -> str:
    """Apply one attempt's outcome to the entry; returns the entry's new state."""
    now = now or utcnow()
    with store.db.session() as session:
        entry = session.exec(select(OutboxEntry).where(OutboxEntry.id == claimed.id).with_for_update()).first()
        if entry is None or not _holds(entry, claimed):
            # dropped by an operator meanwhile, or its lease ran out and another sender holds it now
            return entry.state if entry is not None else "gone"
        entry.attempts += 1
        outcome = result.outcome
        if outcome == "retry" and now - _window_start(session, entry) > timedelta(seconds=policy.max_age):
            outcome, result = "dead", replace(result, outcome="expired", detail=f"max age reached; {result.detail}")
        if outcome == "delivered":
            entry.state, entry.delivered_at, entry.last_error = "delivered", now, None
        elif outcome == "dead":
            entry.state, entry.last_error = "dead", result.detail[:512]
        else:
            entry.state, entry.last_error = "pending", result.detail[:512]
            entry.next_attempt_at = now + timedelta(seconds=backoff(entry.attempts, policy))
        session.add(entry)
        text = result.peer_text[:4096] or None
        _attempt(session, entry, result, store.cipher.encrypt(text, column=PEER_TEXT_COLUMN))
        # superseded while in flight (publish keeps an entry whose answer is awaited): no retry, no dead
        # letter to requeue; the row locks order this against publish's retirement of the job's entries
        if outcome != "delivered" and entry.job_id in superseded(session, [entry.job_id]):
            retire(session, entry, actor=ACTOR)
        if entry.state in ("delivered", "dropped"):
            _mark_study(session, entry, now)
        state, kind = entry.state, entry.kind
    metrics.DELIVERIES.labels(kind=kind, outcome=result.outcome).inc()
    log.info("outbox attempt", extra={"outbox_id": claimed.id, "destination": claimed.destination,
                                      "state": state, "status": result.peer_status, "attempt": claimed.attempts + 1})
    return state


def _mark_study(session: Session, entry: OutboxEntry, now: datetime) -> None:
    job = session.get(Job, entry.job_id) if entry.job_id else None
    if job is None:
        return
    open_rows = session.exec(
        select(OutboxEntry.id).join(Job, col(Job.id) == col(OutboxEntry.job_id))
        .where(Job.study_id == job.study_id, col(OutboxEntry.state).in_(OPEN_STATES))
    ).first()
    study = session.get(Study, job.study_id)
    if open_rows is None and study is not None and study.delivered_at is None:
        study.delivered_at = now
        session.add(study)
        audit.append(session, kind="study.delivered", actor=ACTOR, subject=f"study:{study.id}",
                     detail={"job_id": job.id})


# --- delivery (the per-destination senders: msgate.results.outbox_send) -------------------------


def deliver(store: Store, items: Sequence[Claimed], policy: Policy) -> None:
    """Send a claimed batch: destinations in parallel, each destination's objects in order."""
    groups: dict[str, list[Claimed]] = defaultdict(list)
    for item in sorted(items, key=lambda i: (i.created_at, KIND_ORDER.get(i.blob_kind, 9))):
        groups[item.destination].append(item)
    pacs = {d.name: d for d in store.settings.pacs}
    from msgate.results import outbox_send  # it builds on this module's record/renew (imported when sending)

    def one(dest_name: str, batch: list[Claimed]) -> None:
        _renewed.claims = {}
        try:
            if dest_name == HL7_DESTINATION:
                outbox_send.deliver_hl7(store, batch, policy)
            elif dest_name in pacs:
                outbox_send.deliver_dicom(store, pacs[dest_name], batch, policy)
            else:
                for item in batch:
                    record(store, item, Attempt("retry", "", "destination not configured"), policy)
        except Exception as exc:  # a bug or an odd object: the batch's unanswered entries retry with backoff
            log.exception("outbox delivery failed", extra={"destination": dest_name})
            failed = Attempt("retry", type(exc).__name__[:64], f"unexpected error while sending ({type(exc).__name__})")
            for item in batch:  # entries that already have an outcome are no longer held: record() skips them
                record(store, _renewed.claims.get(item.id, item), failed, policy)
        finally:
            _renewed.claims = None

    if len(groups) == 1:
        one(*next(iter(groups.items())))
        return
    with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="outbox") as pool:
        for future in [pool.submit(one, name, batch) for name, batch in groups.items()]:
            future.result()


def run_once(store: Store, policy: Policy | None = None) -> int:
    """Claim and deliver one round; returns the number of entries attempted."""
    policy = policy or Policy.from_settings(store.settings)
    items = claim(store, policy)
    if items:
        deliver(store, items, policy)
    return len(items)


def _lane(store: Store, stop: threading.Event, policy: Policy, destination: str | None,
          exclude: Sequence[str]) -> None:
    """One destination's delivery loop, so a slow or unreachable peer never delays the others."""
    while not stop.is_set():
        try:
            items = claim(store, policy, destination=destination, exclude=exclude)
            if items:
                deliver(store, items, policy)
        except Transient:
            log.warning("outbox round failed; retrying", extra={"reason": "transient", "destination": destination})
            items = []
        except Exception:
            log.exception("outbox lane failed; retrying", extra={"destination": destination})
            items = []
        if not items:
            stop.wait(policy.poll)


def warn_unrouted(settings: Settings) -> list[str]:
    """Warn at start about results that will go nowhere: ``enqueue`` skips an object without a destination,
    so its study is never marked delivered (and retention never purges it). Returns the warnings."""
    missing = []
    if not settings.pacs:
        missing.append("no PACS destination (MSGATE_PACS): SR, SEG, parametric maps and key images are not sent")
    if settings.hl7_out is None:
        missing.append("no interface engine (MSGATE_HL7_OUT): ORU^R01 results are not sent")
    for text in missing:
        log.warning(text + "; results are kept in the store only", extra={"reason": "unrouted"})
    return missing


def run(store: Store, stop: threading.Event, policy: Policy | None = None, *, consume: bool = True) -> None:
    """The ``publish`` role: consume ``msgate.publish`` tasks and deliver until ``stop`` is set.

    One lane (thread) per configured destination, plus one that dead-ends entries for destinations
    that are no longer configured (they are retried until their max age, then dead-lettered).
    """
    from msgate.results.consumer import PublishConsumer

    policy = policy or Policy.from_settings(store.settings)
    settings = store.settings
    names = [d.name for d in settings.pacs] + ([HL7_DESTINATION] if settings.hl7_out is not None else [])
    warn_unrouted(settings)
    lanes = [threading.Thread(target=_lane, args=(store, stop, policy, name, ()), name=f"outbox-{name}", daemon=True)
             for name in names]
    lanes.append(threading.Thread(target=_lane, args=(store, stop, policy, None, names), name="outbox-other",
                                  daemon=True))
    consumer = PublishConsumer(store).start() if consume else None
    for lane in lanes:
        lane.start()
    log.info("outbox sender started", extra={"count": len(names)})
    try:
        while not stop.is_set():
            if consumer is not None and not consumer.alive():
                raise RuntimeError("the publish consumer stopped")
            stop.wait(policy.poll)
    finally:
        stop.set()
        for lane in lanes:
            lane.join(timeout=policy.dimse_timeout + 5)
        if consumer is not None:
            consumer.stop()
        log.info("outbox sender stopped")
