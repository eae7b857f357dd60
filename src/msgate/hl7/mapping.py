"""Mapping path: full tolerant parse of a stored message, then patients, orders and observations.

Runs off the ACK path (a worker thread in the HL7 role, or ``msgate messages replay``). Each message is
mapped inside a savepoint, so one bad message ends in the operator-visible ``error`` state
(``Hl7Message.mapping_state``/``mapping_error``, a code without PHI) and the others still commit.

- ADT A01/A04/A05/A08/A28/A31: patient create/update from PID (PID-3 identifiers with assigning
  authority, PID-5 name, PID-7 birth date, PID-8 sex; all encrypted). A40: merge (PID survives, MRG-1 retires).
- ORM^O01, OMI^O23, OMG^O19: orders from ORC/OBR (placer ORC-2/OBR-2, filler ORC-3/OBR-3, accession
  IPC-1 or OBR-18, linked to DICOM (0008,0050) by the same blind index as the DICOM ingest).
- ORU^R01: one observation per OBX; the feature is found by code (``model/features.py``), the value is
  converted to the feature's unit; OBX-11 ``C`` replaces, ``X``/``W``/``D`` withdraw.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import insert
from sqlmodel import Session, col, select

from msgate.hl7.parse import Message, ParseError, Segment, parse
from msgate.hl7.units import convert
from msgate.model.features import FEATURES, FeatureSpec
from msgate.storage import repo_ehr
from msgate.storage.models import Hl7Message, Observation, Order, Patient, Study, utcnow
from msgate.storage.repo_ehr import Identifier
from msgate.storage.store import Store

log = logging.getLogger(__name__)

PATIENT_TRIGGERS = {"A01", "A04", "A05", "A08", "A28", "A31"}
MERGE_TRIGGERS = {"A40", "A34", "A39"}
ORDER_TYPES = {("ORM", "O01"), ("OMI", "O23"), ("OMG", "O19")}
WITHDRAW = {"X", "W", "D"}
SYSTEM_ALIASES = {"LOINC": "LN", "LN": "LN", "L": "L", "99LOCAL": "L", "LOCAL": "L"}
_BY_CODE: dict[tuple[str, str], FeatureSpec] = {}
for _spec in FEATURES:
    for _code, _system in _spec.codes:
        _BY_CODE[(_code.upper(), _system.upper())] = _spec


class MappingError(Exception):
    """A message cannot be mapped; ``code`` is safe to log and to show (no PHI)."""


@dataclass
class Outcome:
    state: str  # mapped | skipped | error
    error: str | None = None
    findings: list[dict[str, str]] = field(default_factory=list)
    patient_id: int | None = None


def parse_ts(value: str) -> datetime | None:
    """HL7 TS/DTM ``YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ]`` as aware UTC (no offset: UTC)."""
    value = value.strip()
    if not value[:4].isdigit():
        return None
    offset = timezone.utc
    for sign in ("+", "-"):
        if sign in value[4:]:
            value, _, zone = value.rpartition(sign)
            if zone[:4].isdigit() and len(zone) >= 4:
                minutes = int(zone[:2]) * 60 + int(zone[2:4])
                offset = timezone(timedelta(minutes=minutes if sign == "+" else -minutes))
            break
    digits = value.split(".")[0]
    try:
        parts = [int(digits[0:4]), int(digits[4:6] or 1), int(digits[6:8] or 1), int(digits[8:10] or 0),
                 int(digits[10:12] or 0), int(digits[12:14] or 0)]
        return datetime(*parts, tzinfo=offset).astimezone(UTC)  # type: ignore[misc]
    except ValueError:
        return None


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


def _patient_from_pid(session: Session, store: Store, pid: Segment, outcome: Outcome, *,
                      demographics: bool = True) -> Patient:
    idents = identifiers(pid, 3) or identifiers(pid, 2) or identifiers(pid, 4)
    if not idents:
        raise MappingError("no_patient_identifier")
    family, given, middle = pid.get(5, 1, 1), pid.get(5, 2), pid.get(5, 3)
    name = "^".join(p for p in (family, given, middle)).rstrip("^") or None
    birth = pid.get(7, 1)[:8] or None
    if birth and (not birth.isdigit() or parse_ts(birth) is None):
        outcome.findings.append({"code": "invalid_birth_date", "location": "PID^1^7", "severity": "W"})
        birth = None
    sex = pid.get(8).strip().upper()[:1] or None
    patient = repo_ehr.upsert_patient(session, store.cipher, idents, name=name, birth_date=birth, sex=sex,
                                      update_demographics=demographics)
    outcome.patient_id = patient.id
    return patient


def _map_adt(session: Session, store: Store, msg: Message, trigger: str, outcome: Outcome) -> None:
    if trigger in MERGE_TRIGGERS:
        pairs = 0
        segs = msg.segments
        for i, seg in enumerate(segs):
            if seg.name != "PID":
                continue
            mrg = next((s for s in segs[i + 1:] if s.name in ("MRG", "PID")), None)
            surviving = _patient_from_pid(session, store, seg, outcome)
            if mrg is None or mrg.name != "MRG":
                raise MappingError("merge_without_mrg")
            retired_ids = identifiers(mrg, 1)
            retired = repo_ehr.find_patient(session, store.cipher, retired_ids)
            if retired is not None:
                repo_ehr.merge(session, survivor_patient=surviving, retired=retired)
            repo_ehr.add_identifiers(session, store.cipher, surviving, retired_ids)
            pairs += 1
        if not pairs:
            raise MappingError("no_patient_segment")
        return
    if trigger not in PATIENT_TRIGGERS:
        outcome.state = "skipped"
        return
    pid = msg.first("PID")
    if pid is None:
        raise MappingError("no_patient_segment")
    _patient_from_pid(session, store, pid, outcome)


def _index(store: Store, value: str, scope: str) -> tuple[str | None, bytes | None]:
    if not value:
        return None, None
    return store.cipher.blind_index(value, scope=scope), store.cipher.encrypt(value, column=f"order.{scope}")


def _map_order(session: Session, store: Store, msg: Message, message_id: int, outcome: Outcome) -> None:
    pid = msg.first("PID")
    patient = _patient_from_pid(session, store, pid, outcome, demographics=False) if pid is not None else None
    orcs = msg.all("ORC")
    if not orcs:
        raise MappingError("no_order_segment")
    segs = msg.segments
    for i, orc in enumerate(segs):
        if orc.name != "ORC":
            continue
        group = []
        for seg in segs[i + 1:]:
            if seg.name == "ORC":
                break
            group.append(seg)
        obr = next((s for s in group if s.name == "OBR"), None)
        ipc = next((s for s in group if s.name == "IPC"), None)
        placer = orc.get(2) or (obr.get(2) if obr else "")
        filler = orc.get(3) or (obr.get(3) if obr else "")
        accession = (ipc.get(1) if ipc else "") or (obr.get(18) if obr else "")
        _upsert_order(session, store, patient, placer.strip(), filler.strip(), accession.strip(), orc, obr, message_id)


def _upsert_order(session: Session, store: Store, patient: Patient | None, placer: str, filler: str, accession: str,
                  orc: Segment, obr: Segment | None, message_id: int) -> None:
    placer_i, placer_e = _index(store, placer, "placer")
    filler_i, filler_e = _index(store, filler, "filler")
    acc_i, acc_e = _index(store, accession, "accession")
    order = None
    for column, value in ((Order.placer_index, placer_i), (Order.filler_index, filler_i),
                          (Order.accession_index, acc_i)):
        if value and order is None:
            order = session.exec(select(Order).where(col(column) == value)).first()
    order = order or Order()
    order.patient_id = patient.id if patient is not None else order.patient_id
    order.placer_index, order.placer_enc = placer_i or order.placer_index, placer_e or order.placer_enc
    order.filler_index, order.filler_enc = filler_i or order.filler_index, filler_e or order.filler_enc
    order.accession_index, order.accession_enc = acc_i or order.accession_index, acc_e or order.accession_enc
    order.status = (orc.get(1) or orc.get(5))[:8]
    order.procedure_code = (obr.get(4) if obr else "")[:64]
    order.ordered_at = parse_ts(orc.get(9)) or (parse_ts(obr.get(6)) if obr else None) or order.ordered_at
    order.message_id, order.updated_at = message_id, utcnow()
    session.add(order)
    session.flush()
    if acc_i and patient is not None:
        for study in session.exec(select(Study).where(Study.accession_index == acc_i)).all():
            if study.patient_id is None:
                study.patient_id = patient.id
                session.add(study)


def feature_for(code: str, system: str, alt_code: str = "", alt_system: str = "") -> tuple[FeatureSpec | None, str,
                                                                                             str]:
    for c, s in ((code, system), (alt_code, alt_system)):
        if not c:
            continue
        norm = SYSTEM_ALIASES.get(s.upper(), s.upper())
        spec = _BY_CODE.get((c.upper(), norm)) or (_BY_CODE.get((c.upper(), "L")) if norm in ("", "L") else None)
        if spec is not None:
            return spec, c, norm
    return None, code, SYSTEM_ALIASES.get(system.upper(), system.upper())


def obx_value(obx: Segment, vtype: str) -> str:
    """OBX-5 as text: NM/SN numeric text, CE/CWE code (or text), text types unescaped and joined."""
    if vtype in ("CE", "CWE", "CNE", "CF"):
        return obx.get(5, 1) or obx.get(5, 2)
    if vtype == "SN":
        comparator, number = obx.get(5, 1), obx.get(5, 2)
        return number if comparator in ("", "=") else f"{comparator}{number}"
    if vtype == "ED":
        return ""
    reps = obx.reps(5)
    texts = [obx.get(5, 1, rep=i) if vtype in ("NM", "TM", "DT", "DTM", "TS", "ID", "IS")
             else "^".join(filter(None, (obx.get(5, c, rep=i) for c in range(1, 8)))) for i in range(len(reps))]
    return "\n".join(texts)


def _observation(store: Store, obx: Segment, obr: Segment | None, msg: Message, patient_id: int, message_id: int,
                 outcome: Outcome, n: int) -> dict[str, Any] | None:
    vtype = obx.get(2).strip().upper()
    code, system = obx.get(3, 1).strip(), obx.get(3, 3).strip()
    if not code:
        outcome.findings.append({"code": "obx_without_code", "location": f"OBX^{n}^3", "severity": "W"})
        return None
    spec, code, system = feature_for(code, system, obx.get(3, 4).strip(), obx.get(3, 6).strip())
    value = obx_value(obx, vtype)
    unit = obx.get(6, 1).strip()
    feature = spec.name if spec is not None else None
    if spec is not None and spec.kind == "numeric" and value:
        try:
            converted = convert(float(value), unit, spec.unit)
        except ValueError:
            converted = None
            outcome.findings.append({"code": "value_not_numeric", "location": f"OBX^{n}^5", "severity": "W"})
        if converted is None:
            outcome.findings.append({"code": "unit_not_convertible", "location": f"OBX^{n}^6", "severity": "W"})
            feature = None
        else:
            value, unit = repr(round(converted, 6)), spec.unit
    observed = (parse_ts(obx.get(14)) or (parse_ts(obr.get(7)) if obr else None) or parse_ts(msg.msh.get(7)))
    return {"patient_id": patient_id, "feature": feature, "code": code[:64], "code_system": system[:16],
            "value_enc": store.cipher.encrypt(value[:65536], column="observation.value"), "value_type": vtype[:4],
            "unit": unit[:32], "status": (obx.get(11).strip().upper() or "F")[:2], "observed_at": observed,
            "withdrawn": False, "message_id": message_id, "updated_at": utcnow()}


def _map_oru(session: Session, store: Store, msg: Message, message_id: int, outcome: Outcome) -> None:
    pid = msg.first("PID")
    if pid is None:
        raise MappingError("no_patient_segment")
    patient = _patient_from_pid(session, store, pid, outcome, demographics=False)
    assert patient.id is not None
    rows: list[dict[str, Any]] = []
    obr: Segment | None = None
    n = 0
    for seg in msg.segments:
        if seg.name == "OBR":
            obr = seg
        elif seg.name == "OBX":
            n += 1
            row = _observation(store, seg, obr, msg, patient.id, message_id, outcome, n)
            if row is not None:
                rows.append(row)
    if not rows:
        outcome.findings.append({"code": "no_observations", "location": "OBX", "severity": "W"})
        return
    _apply_observations(session, patient.id, rows)


def _apply_observations(session: Session, patient_id: int, rows: list[dict[str, Any]]) -> None:
    """Insert new values; a result for the same code and time replaces (C) or withdraws (X/W/D) the old one."""
    codes = {r["code"] for r in rows}
    existing: dict[tuple[str, str, Any], Observation] = {}
    for obs in session.exec(select(Observation).where(Observation.patient_id == patient_id,
                                                      col(Observation.code).in_(codes))).all():
        existing[(obs.code, obs.code_system, obs.observed_at)] = obs
    fresh = []
    for row in rows:
        old = existing.get((row["code"], row["code_system"], row["observed_at"]))
        if old is None:
            row["withdrawn"] = row["status"] in WITHDRAW
            fresh.append(row)
            continue
        if row["status"] in WITHDRAW:
            old.withdrawn, old.status = True, row["status"]
        else:
            for key in ("value_enc", "value_type", "unit", "status", "feature", "message_id"):
                setattr(old, key, row[key])
            old.withdrawn = False
        old.updated_at = utcnow()
        session.add(old)
    if fresh:
        session.execute(insert(Observation.__table__), fresh)  # type: ignore[attr-defined]  # Core executemany


def map_parsed(session: Session, store: Store, msg: Message, message_id: int) -> Outcome:
    outcome = Outcome(state="mapped", findings=list(msg.findings))
    mtype, trigger = msg.msh.get(9, 1).strip().upper(), msg.msh.get(9, 2).strip().upper()
    if mtype == "ADT":
        _map_adt(session, store, msg, trigger, outcome)
    elif (mtype, trigger) in ORDER_TYPES:
        _map_order(session, store, msg, message_id, outcome)
    elif mtype == "ORU" and trigger in ("R01", ""):
        if not trigger:
            outcome.findings.append({"code": "missing_trigger_event", "location": "MSH^1^9^2", "severity": "W"})
        _map_oru(session, store, msg, message_id, outcome)
    else:
        outcome.state = "skipped"
    return outcome


def map_messages(store: Store, message_ids: Sequence[int], *, acks: dict[int, str] | None = None,
                 raws: dict[int, bytes] | None = None) -> dict[int, Outcome]:
    """Map stored messages; record state, findings and ACK code on each row.

    Fast path: the whole batch in one transaction. If any message fails, that transaction is rolled
    back and each message is mapped in its own transaction, so one bad message ends in the ``error``
    state without taking the others with it. ``raws`` (message id -> bytes) saves re-reading blobs.
    """
    try:
        with store.db.session() as session:
            return {mid: outcome for mid in message_ids
                    if (outcome := _map_row(session, store, mid, acks, raws, strict=True)) is not None}
    except _BatchFailed:
        pass
    results: dict[int, Outcome] = {}
    for mid in message_ids:
        try:
            with store.db.session() as session:
                outcome = _map_row(session, store, mid, acks, raws, strict=True)
        except _BatchFailed as failed:
            with store.db.session() as session:
                outcome = _map_row(session, store, mid, acks, raws, strict=False, failed=failed.outcome)
        if outcome is not None:
            results[mid] = outcome
    return results


class _BatchFailed(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


def _map_row(session: Session, store: Store, message_id: int, acks: dict[int, str] | None,
             raws: dict[int, bytes] | None, *, strict: bool, failed: Outcome | None = None) -> Outcome | None:
    row = session.get(Hl7Message, message_id)
    if row is None:
        return None
    outcome = failed or _map_one(session, store, row, (raws or {}).get(message_id))
    if outcome.state == "error" and strict:
        raise _BatchFailed(outcome)
    row.mapping_state, row.mapping_error = outcome.state, outcome.error
    row.patient_id = outcome.patient_id or row.patient_id
    row.validation = {**(row.validation or {}), "findings": outcome.findings}
    if acks and message_id in acks and row.ack_code is None:
        row.ack_code, row.ack_at = acks[message_id], utcnow()
    session.add(row)
    return outcome


def _map_one(session: Session, store: Store, row: Hl7Message, raw: bytes | None = None) -> Outcome:
    assert row.id is not None
    try:
        msg = parse(raw if raw is not None else store.blobs.read(session, row.blob_id))
    except ParseError as exc:
        return Outcome(state="error", error=f"unparseable:{exc.code}"[:256])
    try:
        return map_parsed(session, store, msg, row.id)
    except MappingError as exc:
        return Outcome(state="error", error=str(exc))
    except Exception as exc:  # the mapping edge: keep the row in an operator-visible error state
        log.exception("mapping failed", extra={"message_id": row.id})
        return Outcome(state="error", error=f"internal:{type(exc).__name__}")
