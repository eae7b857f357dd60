"""The MSH-10 of the ORUs the outbox sends: one per entry and copy, the copy moving on only after an
explicit negative answer (a resend after no answer keeps its control id)."""

from __future__ import annotations

from sqlmodel import col, func, select

from msgate.storage.models import OutboxAttempt
from msgate.storage.store import Store

NEGATIVE_ANSWERS = ("nak", "rejected")  # peer_status of an HL7 attempt answered AE/CE/other, or AR/CR


def control_id(entry_id: str, copy: int) -> str:
    """The MSH-10 of an entry's ``copy``-th message (20 characters at most, HL7 v2.5.1 ST): the entry id
    (uuid4 hex) keeps it apart from every other entry's, the copy number from its own earlier ones."""
    return f"MG{entry_id[:14]}{copy % 10000:04d}"


def message_copy(store: Store, entry_id: str) -> int:
    """1 + the explicit negative answers the entry got (:data:`NEGATIVE_ANSWERS`). A resend after no
    answer keeps its MSH-10 (HL7 v2.5.1 2.9.2, 2.10.3): it used to get a new one per attempt, so an engine
    that filed the first copy (its ACK lost) could not recognise the second as a duplicate."""
    with store.db.session() as session:
        return 1 + session.exec(select(func.count()).select_from(OutboxAttempt).where(
            OutboxAttempt.entry_id == entry_id, col(OutboxAttempt.peer_status).in_(NEGATIVE_ANSWERS))).one()
