"""Mapping path: full tolerant parse of a stored message, then patients, orders and observations.

Runs off the ACK path (a worker thread in the HL7 role, or ``msgate messages replay``). Each message is
mapped inside a savepoint, so one bad message ends in the operator-visible ``error`` state
(``Hl7Message.mapping_state``/``mapping_error``, a code without PHI) and the others still commit.

- ADT A01/A04/A05/A08/A28/A31: patient create/update from PID (PID-3 identifiers with assigning
  authority, PID-5 name, PID-7 birth date, PID-8 sex; all encrypted). Merges, A47: :mod:`.identity_events`.
- ORM^O01, OMI^O23, OMG^O19: orders from ORC/OBR (placer ORC-2/OBR-2, filler ORC-3/OBR-3, each with its
  namespace EI.2-EI.4 for the ORU, accession IPC-1 or OBR-18, linked to DICOM (0008,0050) by the same
  blind index as the DICOM ingest).
- ORU^R01: one observation per OBX; the feature is found by code (``model/features.py``), the value is
  converted to the feature's unit; OBX-11 ``C`` replaces, ``X``/``W``/``D`` withdraw the value of the same
  observation time (OBX-14, else OBR-7) or, without either, the newest value of that code observed by the
  message's MSH-7 (:mod:`msgate.hl7.observations`).

A batch is one transaction (:class:`Tx`): its messages' rows are read in one select, the patients their
identifiers name are looked up together and remembered, and observations are written with a few
``executemany`` statements at the end; the outcome is that of mapping each message in turn.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

from sqlmodel import Session, col, select

from msgate.hl7.observations import ObservationWriter, feature_for, message_rows, obx_value
from msgate.hl7.parse import Message, ParseError, Segment, parse
from msgate.storage import repo_ehr
from msgate.storage.models import Hl7Message, Order, Patient, Study, utcnow
from msgate.storage.repo_ehr import Identifier
from msgate.storage.store import Store

log = logging.getLogger(__name__)

PATIENT_TRIGGERS = {"A01", "A04", "A05", "A08", "A28", "A31"}
ORDER_TYPES = {("ORM", "O01"), ("OMI", "O23"), ("OMG", "O19")}
NULL = '""'  # the explicit null (HL7 v2.5.1 §2.5.3): delete the stored value; "" in a field, never data
ONLY_TRIGGER = {"ORM": "O01", "ORU": "R01"}  # the one event of each before v2.5: implied when none is sent
__all__ = ["map_messages", "map_parsed", "feature_for", "obx_value", "parse_ts", "identifiers", "Outcome", "Tx"]


class MappingError(Exception):
    """A message cannot be mapped; ``code`` is safe to log and to show (no PHI)."""


@dataclass
class Outcome:
    state: str  # mapped | skipped | error
    error: str | None = None
    findings: list[dict[str, str]] = field(default_factory=list)
    patient_id: int | None = None


@dataclass
class Tx:
    """One mapping transaction: its session, the patients it knows by identifier index, its pending writes."""

    session: Session
    store: Store
    patients: repo_ehr.KnownPatients = field(default_factory=repo_ehr.KnownPatients)
    observations: ObservationWriter = field(init=False)

    def __post_init__(self) -> None:
        self.observations = ObservationWriter(self.session)

    def preload(self, messages: list[Message]) -> None:
        """Look up the patients of every PID in the batch at once (rows stay in the session)."""
        idents = [i for msg in messages for pid in msg.all("PID") for i in pid_identifiers(pid)]
        self.patients = repo_ehr.patients_by_index(self.session, self.store.cipher, idents)

    def merged(self) -> None:
        """Identifiers moved between patients: forget what was known (pending writes went out first)."""
        self.patients.clear()

    def flush(self) -> None:
        """Write what is pending: before a merge or an order reads them, and before the commit."""
        repo_ehr.link_studies(self.session, self.patients)
        self.observations.flush()


def parse_ts(value: str, default: timezone = timezone.utc) -> datetime | None:
    """HL7 TS/DTM ``YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ]`` as aware UTC. Without an offset the time is
    the sender's local time (HL7 v2.5.1 2.A.22): ``default`` is the offset of the message's MSH-7."""
    value, zone, valid = _split_zone(value.strip())
    if not value[:4].isdigit() or not valid:
        return None
    offset = zone or default
    digits = value.split(".")[0]
    try:
        parts = [int(digits[0:4]), int(digits[4:6] or 1), int(digits[6:8] or 1), int(digits[8:10] or 0),
                 int(digits[10:12] or 0), int(digits[12:14] or 0)]
        return datetime(*parts, tzinfo=offset).astimezone(UTC)  # type: ignore[misc]
    except ValueError:
        return None


def _split_zone(value: str) -> tuple[str, timezone | None, bool]:
    """(the time without its ``+/-ZZZZ``, that offset or None, whether the offset is usable). An offset
    outside -23:59..+23:59 is not (``timezone`` refuses it with ValueError, which used to fail the
    whole message): the time it qualifies is invalid."""
    for sign in ("+", "-"):
        if sign in value[4:]:
            value, _, zone = value.rpartition(sign)
            if zone[:4].isdigit() and len(zone) >= 4:
                hours, minutes = int(zone[:2]), int(zone[2:4])
                if hours > 23 or minutes > 59:
                    return value, None, False
                total = hours * 60 + minutes
                return value, timezone(timedelta(minutes=total if sign == "+" else -total)), True
            return value, None, True
    return value, None, True


def sender_offset(msh7: str) -> timezone:
    """The UTC offset MSH-7 states: the sender's zone, for its times that state none (else UTC)."""
    return _split_zone(msh7.strip())[1] or timezone.utc


def identifiers(seg: Segment, n: int = 3) -> list[Identifier]:
    """CX repetitions of a field (PID-3, MRG-1): id, assigning authority (CX-4.1 or .2), type (CX-5)."""
    out = []
    for i, _ in enumerate(seg.reps(n)):
        value = seg.get(n, 1, rep=i).strip()
        if not value or value == '""':
            continue
        authority = seg.get(n, 4, 1, rep=i).strip() or seg.get(n, 4, 2, rep=i).strip()
        out.append(Identifier(value=value, authority=authority, id_type=seg.get(n, 5, rep=i).strip() or "MR"))
    return out


def pid_identifiers(pid: Segment) -> list[Identifier]:
    """PID-3 (patient identifier list), else the older PID-2 / PID-4."""
    return identifiers(pid, 3) or identifiers(pid, 2) or identifiers(pid, 4)


def _value(text: str) -> str:
    """A value with the explicit null read as empty (where there is nothing stored to delete)."""
    text = text.strip()
    return "" if text == NULL else text


def _patient_from_pid(tx: Tx, pid: Segment, outcome: Outcome, *, demographics: bool = True) -> Patient:
    idents = pid_identifiers(pid)
    if not any(map(repo_ehr.is_patient_identifier, idents)):  # only patient identifiers find a patient
        raise MappingError("no_patient_identifier")
    cleared = frozenset(column for column, n in (("name", 5), ("birth_date", 7), ("sex", 8))
                        if pid.raw(n).strip() == NULL)
    family, given, middle = (_value(pid.get(5, c)) for c in (1, 2, 3))
    name = None if "name" in cleared else "^".join(p for p in (family, given, middle)).rstrip("^") or None
    birth = None if "birth_date" in cleared else pid.get(7, 1)[:8] or None
    if birth and (not birth.isdigit() or parse_ts(birth) is None):
        outcome.findings.append({"code": "invalid_birth_date", "location": "PID^1^7", "severity": "W"})
        birth = None
    sex = None if "sex" in cleared else pid.get(8).strip().upper()[:1] or None
    patient = repo_ehr.upsert_patient(tx.session, tx.store.cipher, idents, name=name, birth_date=birth, sex=sex,
                                      clear=cleared, update_demographics=demographics, known=tx.patients)
    outcome.patient_id = patient.id
    return patient


def _map_adt(tx: Tx, msg: Message, trigger: str, outcome: Outcome, message_id: int) -> None:
    from msgate.hl7 import identity_events  # imported here: it builds on this module's PID helpers

    if identity_events.apply(tx, msg, trigger, outcome, message_id):
        return
    if trigger not in PATIENT_TRIGGERS:
        outcome.state = "skipped"
        return
    pid = msg.first("PID")
    if pid is None:
        raise MappingError("no_patient_segment")
    _patient_from_pid(tx, pid, outcome)


def _index(store: Store, value: str, scope: str, namespace: str = "") -> tuple[str | None, bytes | None]:
    """The blind index (:func:`order_index`) and the encrypted number."""
    if not value:
        return None, None
    return order_index(store, value, scope, namespace), store.cipher.encrypt(value, column=f"order.{scope}")


def _entity(seg: Segment | None, n: int) -> tuple[str, str]:
    """An EI field: (entity identifier, namespace ID or else universal ID)."""
    if seg is None:
        return "", ""
    return _value(seg.get(n)), _value(seg.get(n, 2) or seg.get(n, 3))


def _entity_authority(seg: Segment | None, n: int) -> tuple[str, ...]:
    """EI.2-EI.4 of an EI field (namespace ID, universal ID, universal ID type), trailing empty ones left
    out: what the ORU sends back with the number (ORC-2/3, OBR-2/3)."""
    if seg is None:
        return ()
    parts = [_value(seg.get(n, c)) for c in (2, 3, 4)]
    while parts and not parts[-1]:
        parts.pop()
    return tuple(parts)


def _authority_enc(store: Store, parts: tuple[str, ...], scope: str) -> bytes | None:
    """``order.placer_authority_enc`` / ``filler_authority_enc``: the parts as a JSON list, encrypted."""
    return store.cipher.encrypt(json.dumps(list(parts)), column=f"order.{scope}_authority") if parts else None


@dataclass(frozen=True)
class OrderGroup:
    """One ORC group of an order message and the numbers the mapping keys its order by."""

    orc: Segment
    obr: Segment | None
    placer: tuple[str, str]  # (entity identifier, namespace)
    filler: tuple[str, str]
    accession: str
    placer_authority: tuple[str, ...] = ()  # EI.2-EI.4 as sent (:func:`_entity_authority`)
    filler_authority: tuple[str, ...] = ()


def order_groups(segments: Sequence[Segment]) -> list[OrderGroup]:
    """Each ORC with the segments up to the next ORC: placer and filler from ORC, else OBR; the accession
    from IPC-1, else OBR-18. ``msgate trace`` reads a stored order message through this too, so it finds
    the orders the mapping wrote."""
    groups = []
    for i, orc in enumerate(segments):
        if orc.name != "ORC":
            continue
        group = []
        for seg in segments[i + 1:]:
            if seg.name == "ORC":
                break
            group.append(seg)
        obr = next((s for s in group if s.name == "OBR"), None)
        ipc = next((s for s in group if s.name == "IPC"), None)
        placer_seg = orc if _value(orc.get(2)) else obr
        filler_seg = orc if _value(orc.get(3)) else obr
        accession = _value(ipc.get(1) if ipc else "") or _value(obr.get(18) if obr else "")
        groups.append(OrderGroup(orc, obr, _entity(placer_seg, 2), _entity(filler_seg, 3), accession,
                                 _entity_authority(placer_seg, 2), _entity_authority(filler_seg, 3)))
    return groups


def order_index(store: Store, value: str, scope: str, namespace: str = "") -> str | None:
    """The blind index an order number is stored under (``order.placer_index`` etc.): the number and its
    assigning namespace (placer 1001 of HIS_A is not 1001 of HIS_B)."""
    if not value:
        return None
    return store.cipher.blind_index(f"{value}|{namespace}" if namespace else value, scope=scope)


def _map_order(tx: Tx, msg: Message, message_id: int, outcome: Outcome) -> None:
    session, store = tx.session, tx.store
    pid = msg.first("PID")
    patient = _patient_from_pid(tx, pid, outcome, demographics=False) if pid is not None else None
    repo_ehr.link_studies(session, tx.patients)  # the order's studies are read below
    orcs = msg.all("ORC")
    if not orcs:
        raise MappingError("no_order_segment")
    for group in order_groups(msg.segments):
        _upsert_order(session, store, patient, group, message_id, zone=sender_offset(msg.msh.get(7)))


def _upsert_order(session: Session, store: Store, patient: Patient | None, group: OrderGroup, message_id: int,
                  *, zone: timezone) -> None:
    placer, filler, accession, orc, obr = group.placer, group.filler, group.accession, group.orc, group.obr
    placer_i, placer_e = _index(store, placer[0], "placer", placer[1])
    filler_i, filler_e = _index(store, filler[0], "filler", filler[1])
    acc_i, acc_e = _index(store, accession, "accession")
    order = None
    for column, value in ((Order.placer_index, placer_i), (Order.filler_index, filler_i),
                          (Order.accession_index, acc_i)):
        if value and order is None:
            found = session.exec(select(Order).where(col(column) == value)).first()
            if found is not None and patient is not None and found.patient_id not in (None, patient.id):
                continue  # another patient's order with the same number: never moved to this patient
            order = found
    order = order or Order()
    order.patient_id = patient.id if patient is not None else order.patient_id
    order.placer_index, order.placer_enc = placer_i or order.placer_index, placer_e or order.placer_enc
    order.filler_index, order.filler_enc = filler_i or order.filler_index, filler_e or order.filler_enc
    if placer_e:  # a namespace goes with the number it came with (a new number without one clears it)
        order.placer_authority_enc = _authority_enc(store, group.placer_authority, "placer")
    if filler_e:
        order.filler_authority_enc = _authority_enc(store, group.filler_authority, "filler")
    order.accession_index, order.accession_enc = acc_i or order.accession_index, acc_e or order.accession_enc
    order.status = (orc.get(1) or orc.get(5))[:8]
    order.procedure_code = (obr.get(4) if obr else "")[:64]
    order.ordered_at = parse_ts(orc.get(9), zone) or (parse_ts(obr.get(6), zone) if obr else None) or order.ordered_at
    order.message_id, order.updated_at = message_id, utcnow()
    session.add(order)
    session.flush()
    if acc_i and patient is not None:  # studies of this accession that wait for their patient: only its own
        for study in session.exec(select(Study).where(Study.accession_index == acc_i)).all():
            if study.patient_id is None and repo_ehr.holds_study_id(session, store.cipher, patient.id, study):
                study.patient_id = patient.id
                session.add(study)


def _map_oru(tx: Tx, msg: Message, message_id: int, outcome: Outcome) -> None:
    pid = msg.first("PID")
    if pid is None:
        raise MappingError("no_patient_segment")
    patient = _patient_from_pid(tx, pid, outcome, demographics=False)
    assert patient.id is not None
    rows = message_rows(tx.store.cipher, msg, patient_id=patient.id, message_id=message_id, outcome=outcome,
                        parse_ts=functools.partial(parse_ts, default=sender_offset(msg.msh.get(7))))
    if not rows:
        outcome.findings.append({"code": "no_observations", "location": "OBX", "severity": "W"})
        return
    tx.observations.add(rows)


def _trigger(msg: Message, outcome: Outcome) -> str:
    """MSH-9.2, else EVN-1 (HL7 v2.1 has no MSH-9.2: an ADT's event is in EVN-1), else ''."""
    trigger = msg.msh.get(9, 2).strip().upper()
    evn = msg.first("EVN")
    if not trigger and evn is not None and _value(evn.get(1)):
        trigger = _value(evn.get(1)).upper()
        outcome.findings.append({"code": "trigger_from_evn", "location": "EVN^1^1", "severity": "I"})
    if not trigger:
        outcome.findings.append({"code": "missing_trigger_event", "location": "MSH^1^9^1^2", "severity": "W"})
    return trigger


def map_parsed(tx: Tx, msg: Message, message_id: int) -> Outcome:
    outcome = Outcome(state="mapped", findings=list(msg.findings))
    mtype, trigger = msg.msh.get(9, 1).strip().upper(), _trigger(msg, outcome)
    if not _split_zone(msg.msh.get(7).strip())[2]:
        outcome.findings.append({"code": "invalid_timestamp", "location": "MSH^1^7", "severity": "W"})
    if mtype == "ADT" and not trigger:
        raise MappingError("missing_trigger_event")
    trigger = trigger or ONLY_TRIGGER.get(mtype, "")
    if mtype == "ADT":
        _map_adt(tx, msg, trigger, outcome, message_id)
    elif (mtype, trigger) in ORDER_TYPES:
        _map_order(tx, msg, message_id, outcome)
    elif (mtype, trigger) == ("ORU", "R01"):
        _map_oru(tx, msg, message_id, outcome)
    else:
        outcome.state = "skipped"
    return outcome


def map_messages(store: Store, message_ids: Sequence[int], *, acks: dict[int, str] | None = None,
                 raws: dict[int, bytes] | None = None) -> dict[int, Outcome]:
    """Map stored messages; record state, findings and ACK code on each row.

    Fast path: the whole batch in one transaction. If any message fails (or the batch's writes do), that
    transaction is rolled back and each message is mapped in its own transaction, so one bad message ends
    in the ``error`` state without taking the others with it. ``raws`` (message id -> bytes) saves
    re-reading blobs.
    """
    try:
        return _map_batch(store, message_ids, acks, raws)
    except _BatchFailed:
        pass
    except Exception:  # a write of the batch failed: find out which message it was, one at a time
        log.warning("mapping batch failed; mapping one at a time", extra={"count": len(message_ids)})
    results: dict[int, Outcome] = {}
    for mid in message_ids:
        try:
            outcome = _map_batch(store, [mid], acks, raws).get(mid)
        except _BatchFailed as failed:
            outcome = _map_batch(store, [mid], acks, raws, failed=failed.outcome).get(mid)
        except Exception as exc:
            log.exception("mapping failed", extra={"message_id": mid})
            failure = Outcome(state="error", error=f"internal:{type(exc).__name__}")
            outcome = _map_batch(store, [mid], acks, raws, failed=failure).get(mid)
        if outcome is not None:
            results[mid] = outcome
    return results


class _BatchFailed(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


def _map_batch(store: Store, message_ids: Sequence[int], acks: dict[int, str] | None,
               raws: dict[int, bytes] | None, *, failed: Outcome | None = None) -> dict[int, Outcome]:
    """Map ``message_ids`` in one transaction; raise :class:`_BatchFailed` on the first error, unless
    ``failed`` is given: then that outcome is recorded (for a single message) and nothing is mapped."""
    with store.db.session() as session:
        tx = Tx(session, store)
        rows = {row.id: row for row in session.exec(
            select(Hl7Message).where(col(Hl7Message.id).in_(list(message_ids)))).all()}
        parsed: dict[int, Message | Outcome] = {}
        if failed is None:
            parsed = {mid: _parse(session, store, rows[mid], (raws or {}).get(mid))
                      for mid in message_ids if mid in rows}
            tx.preload([m for m in parsed.values() if isinstance(m, Message)])
        results: dict[int, Outcome] = {}
        for mid in message_ids:
            if mid not in rows:
                continue
            outcome = failed or _map_one(tx, parsed[mid], mid)
            if outcome.state == "error" and failed is None:
                raise _BatchFailed(outcome)
            results[mid] = outcome
        tx.flush()
        for mid, outcome in results.items():  # the rows last: updated together at the commit
            _record(rows[mid], outcome, (acks or {}).get(mid))
        return results


def _record(row: Hl7Message, outcome: Outcome, ack: str | None) -> None:
    row.mapping_state, row.mapping_error = outcome.state, outcome.error
    row.patient_id = outcome.patient_id or row.patient_id
    row.validation = {**(row.validation or {}), "findings": outcome.findings}
    if ack and row.ack_code is None:
        row.ack_code, row.ack_at = ack, utcnow()


def _parse(session: Session, store: Store, row: Hl7Message, raw: bytes | None) -> Message | Outcome:
    try:
        return parse(raw if raw is not None else store.blobs.read(session, row.blob_id))
    except ParseError as exc:
        return Outcome(state="error", error=f"unparseable:{exc.code}"[:256])


def _map_one(tx: Tx, parsed: Message | Outcome, message_id: int) -> Outcome:
    if isinstance(parsed, Outcome):
        return parsed
    try:
        return map_parsed(tx, parsed, message_id)
    except (MappingError, repo_ehr.IdentifierConflict) as exc:  # codes without PHI
        return Outcome(state="error", error=str(exc))
    except Exception as exc:  # the mapping edge: keep the row in an operator-visible error state
        log.exception("mapping failed", extra={"message_id": message_id})
        return Outcome(state="error", error=f"internal:{type(exc).__name__}")
