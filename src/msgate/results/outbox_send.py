"""The outbox's senders, one per kind of destination: C-STORE to a PACS and ORU^R01 over MLLP to the
interface engine. Each sends a claimed batch over one association (or one MLLP connection), renews each
entry's lease just before its send and records the peer's answer (:func:`msgate.results.outbox.record`).
The queue itself (claims, leases, backoff, dead letters) is :mod:`msgate.results.outbox`.

An engine that acknowledges an ORU only with ACKs for another control id (``ack_mismatch``: its ACK template
fills MSA-2 wrongly) has most likely filed it: resending for the outbox's max age (3 days) could file
about 75 copies. After :data:`ACK_MISMATCH_LIMIT` such attempts in a row the entry is dead-lettered
instead (``msgate outbox retry`` once the engine is fixed; the count starts again).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from sqlmodel import col, select

from msgate.config import PacsDestination
from msgate.errors import CryptoError, MsgateError, Rejected, Transient
from msgate.hl7.client import AckResult, MllpClient, PeerNak, PeerRejected
from msgate.results.control_ids import control_id, message_copy
from msgate.results.dicom_send import Sender, sop_class_of
from msgate.results.hl7_out import with_control_id
from msgate.results.outbox import Attempt, Claimed, Policy, record, renew
from msgate.storage.models import OutboxAttempt
from msgate.storage.store import Store

log = logging.getLogger(__name__)
# Consecutive ack_mismatch attempts of one entry before it is dead-lettered: the first send and two resends
# (a stray ACK or a brief engine glitch is ruled out; at most three copies reach an engine that files each).
ACK_MISMATCH_LIMIT = 3
ACK_MISMATCH = "ack_mismatch"


def _read(store: Store, blob_id: str) -> bytes:
    with store.db.session() as session:
        return store.blobs.read(session, blob_id)


def deliver_dicom(store: Store, dest: PacsDestination, items: Sequence[Claimed], policy: Policy) -> None:
    """One association for the batch; each object's own status decides its outcome."""
    payloads = []
    for item in items:
        try:
            payloads.append((item, _read(store, item.blob_id)))
        except CryptoError as exc:
            record(store, item, Attempt("dead", exc.code, "the stored object cannot be decrypted"), policy)
    if not payloads:
        return
    sender = Sender(dest, calling_aet=store.settings.dicom.ae_title, dimse_timeout=policy.dimse_timeout)
    try:
        sender.open([sop_class_of(data) for _, data in payloads])
    except MsgateError as exc:
        for item, _ in payloads:
            record(store, item, Attempt("retry", exc.code, str(exc)), policy)
        return
    try:
        for claimed, data in payloads:
            item = renew(store, claimed, policy)
            if item is None:
                continue
            out = sender.send(data)
            if out.delivered:
                result = Attempt("delivered", out.detail, "stored by the peer")
            elif out.permanent:
                result = Attempt("dead", out.detail, "permanent C-STORE failure status")
            else:
                result = Attempt("retry", out.detail if out.status is not None else "none", out.detail)
            record(store, item, result, policy)
    finally:
        sender.close()


def deliver_hl7(store: Store, items: Sequence[Claimed], policy: Policy) -> None:
    dest = store.settings.hl7_out
    if dest is None:
        for item in items:
            record(store, item, Attempt("retry", "", "no HL7 destination configured"), policy)
        return
    with MllpClient.for_destination(dest, timeout=policy.hl7_timeout) as client:
        for claimed in items:
            item = renew(store, claimed, policy)
            if item is None:
                continue
            msh10 = control_id(item.id, message_copy(store, item.id))
            try:
                message = with_control_id(_read(store, item.blob_id), msh10)
            except CryptoError as exc:
                record(store, item, Attempt("dead", exc.code, "the stored message cannot be decrypted"), policy)
                continue
            try:
                ack = client.send(message)
                result = _accepted(ack, msh10)
            except Rejected as exc:
                result = Attempt("dead", exc.code, f"MSH-10 {msh10}: {exc}", _peer_text(exc))
            except Transient as exc:
                result = Attempt("retry", exc.code, f"MSH-10 {msh10}: {exc}", _peer_text(exc))
                result = _bounded(store, item, result)
            record(store, item, result, policy)


def _bounded(store: Store, item: Claimed, result: Attempt) -> Attempt:
    """A retry, or a dead letter for the :data:`ACK_MISMATCH_LIMIT`-th ``ack_mismatch`` in a row."""
    if result.peer_status != ACK_MISMATCH or _mismatch_streak(store, item.id) + 1 < ACK_MISMATCH_LIMIT:
        return result
    log.warning("HL7 result dead-lettered: the engine acknowledged only other control ids",
                extra={"outbox_id": item.id, "code": ACK_MISMATCH, "count": ACK_MISMATCH_LIMIT})
    return replace(result, outcome="dead", detail=f"{result.detail}; dead-lettered after "
                   f"{ACK_MISMATCH_LIMIT} attempts in a row answered only for other control ids")


def _mismatch_streak(store: Store, entry_id: str) -> int:
    """The entry's latest attempts that were ``ack_mismatch``, up to the first that was not (an operator
    retry, a timeout, an interrupted send)."""
    with store.db.session() as session:
        latest = session.exec(select(OutboxAttempt.peer_status).where(OutboxAttempt.entry_id == entry_id)
                              .order_by(col(OutboxAttempt.id).desc())
                              .limit(ACK_MISMATCH_LIMIT)).all()
    streak = 0
    for status in latest:
        if status != ACK_MISMATCH:
            break
        streak += 1
    return streak


def _accepted(ack: AckResult, msh10: str) -> Attempt:
    """Delivered. An AA/CA that carries ERR segments (warnings, ERR-4 ``W``/``I``) keeps their codes in the
    detail and its text encrypted; the outcome is the same."""
    if not (ack.errors or ack.condition):
        return Attempt("delivered", ack.code, f"MSH-10 {msh10}")
    return Attempt("delivered", ack.code, f"MSH-10 {msh10}: peer accepted the message ({ack.summary()})",
                   ack.peer_text())


def _peer_text(exc: MsgateError) -> str:
    """The engine's explanation of an AR/AE (:class:`~msgate.hl7.client.PeerRejected`/``PeerNak``), if any."""
    return exc.ack.peer_text() if isinstance(exc, PeerRejected | PeerNak) else ""
