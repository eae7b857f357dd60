"""ORU^R01 observations: one row per OBX (feature by code, value converted to the feature's unit), and the
writes of a mapping transaction, applied in message order with a few statements per batch.

A result for the same patient, code, code system, OBX-4 sub-ID and observation time as an earlier one
replaces it (OBX-11 ``C`` or a resend), or withdraws it (``X``/``W``/``D``). A ``C``/``X``/``W``/``D`` with
neither OBX-14 nor OBR-7 has only its own MSH-7 as a time, which never is the original's: it applies to the
newest value of that patient, code, code system and sub-ID observed no later than its MSH-7 (for a ``C``, the
newest not withdrawn; a withdrawal sent twice withdraws the same value twice, not the one before it).
One that matches nothing is a finding (``retraction_unmatched``/``correction_unmatched`` at OBX-11): it is
stored as a row of its own (withdrawn for ``X``/``W``/``D``). :class:`ObservationWriter` keeps the
transaction's writes in memory and applies them at :meth:`~ObservationWriter.flush`: one select of the
values already stored for the batch's patients and codes, then one ``executemany`` per kind of write, with
exactly the outcome of applying each message in turn (a message's rows do not see each other, as before).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import bindparam, insert, select, update
from sqlmodel import Session

from msgate.hl7.parse import Message, Segment
from msgate.hl7.units import convert
from msgate.model.features import FEATURES, FeatureSpec
from msgate.storage.crypto import FieldCipher
from msgate.storage.models import Observation, utcnow

WITHDRAW = {"X", "W", "D"}
AMEND = WITHDRAW | {"C"}  # refers to a value sent before: one that matches nothing is a finding
SYSTEM_ALIASES = {"LOINC": "LN", "LN": "LN", "L": "L", "99LOCAL": "L", "LOCAL": "L"}
REPLACED = ("value_enc", "value_type", "unit", "status", "feature", "message_id")
_BY_CODE: dict[tuple[str, str], FeatureSpec] = {}
for _spec in FEATURES:
    for _code, _system in _spec.codes:
        _BY_CODE[(_code.upper(), _system.upper())] = _spec

Key = tuple[int, str, str, Any, str]  # patient id, code, code system, observed at, OBX-4 sub-ID
Group = tuple[int, str, str, str]  # patient id, code, code system, OBX-4 sub-ID
_EARLIEST = datetime.min.replace(tzinfo=UTC)


class Findings(Protocol):
    findings: list[dict[str, str]]


@dataclass
class Source:
    """Where a row came from, for matching and findings (kept out of the written columns)."""

    findings: list[dict[str, str]] | None = None  # the message's findings
    n: int = 0  # the OBX's position in the message
    timed: bool = True  # observed at OBX-14 or OBR-7 (else at MSH-7 of its own message)


@dataclass(slots=True)
class _Value:
    """A stored row, or a row an earlier message of this flush adds, that a C/X/W/D may apply to."""

    key: Key
    rank: tuple[int, int]  # stored rows by id, then this flush's rows in order
    oid: int | None = None
    stored_withdrawn: bool = False
    row: dict[str, Any] | None = None

    def withdrawn(self, changes: dict[int, dict[str, Any]]) -> bool:
        if self.row is not None:
            return bool(self.row["withdrawn"])
        assert self.oid is not None
        return bool(changes.get(self.oid, {}).get("withdrawn", self.stored_withdrawn))


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
        comparator, number, separator, second = (obx.get(5, c) for c in (1, 2, 3, 4))
        if separator or second:  # a range (40-50) or a ratio (1:128): not one number
            return f"{comparator}{number}{separator}{second}"
        return number if comparator in ("", "=") else f"{comparator}{number}"
    if vtype == "ED":
        return ""
    reps = obx.reps(5)
    texts = [obx.get(5, 1, rep=i) if vtype in ("NM", "TM", "DT", "DTM", "TS", "ID", "IS")
             else "^".join(filter(None, (obx.get(5, c, rep=i) for c in range(1, 8)))) for i in range(len(reps))]
    return "\n".join(texts)


def observation_row(cipher: FieldCipher, obx: Segment, *, observed: Any, patient_id: int, message_id: int,
                    outcome: Findings, n: int) -> dict[str, Any] | None:
    """The row for one OBX (None without a code); findings for values that cannot feed the model."""
    vtype = obx.get(2).strip().upper()
    code, system = obx.get(3, 1).strip(), obx.get(3, 3).strip()
    if not code:
        outcome.findings.append({"code": "obx_without_code", "location": f"OBX^{n}^3", "severity": "W"})
        return None
    spec, code, system = feature_for(code, system, obx.get(3, 4).strip(), obx.get(3, 6).strip())
    value = obx_value(obx, vtype)
    value = "" if value.strip() == '""' else value  # the explicit null: no value (HL7 v2.5.1 §2.5.3)
    unit = obx.get(6, 1).strip()
    unit = "" if unit == '""' else unit
    feature = spec.name if spec is not None and value else None  # an empty value never feeds the model
    if spec is not None and spec.kind == "numeric" and value:
        try:
            number = float(value)
            if not math.isfinite(number):  # "NaN", "inf": float() takes them, the model cannot
                raise ValueError(value)
            converted = convert(number, unit, spec.unit)
        except ValueError:
            converted = None
            outcome.findings.append({"code": "value_not_numeric", "location": f"OBX^{n}^5", "severity": "W"})
        if converted is None:
            outcome.findings.append({"code": "unit_not_convertible", "location": f"OBX^{n}^6", "severity": "W"})
            feature = None
        else:
            value, unit = repr(round(converted, 6)), spec.unit
    return {"patient_id": patient_id, "feature": feature, "code": code[:64], "code_system": system[:16],
            "value_enc": cipher.encrypt(value[:65536], column="observation.value"), "value_type": vtype[:4],
            "unit": unit[:32], "status": (obx.get(11).strip().upper() or "F")[:2], "observed_at": observed,
            "sub_id": obx.get(4).strip()[:20],
            "withdrawn": False, "message_id": message_id, "updated_at": utcnow(), "_empty": not value}


def message_rows(cipher: FieldCipher, msg: Message, *, patient_id: int, message_id: int, outcome: Findings,
                 parse_ts: Any) -> list[dict[str, Any]]:
    """Rows for every OBX of an ORU, each timed by OBX-14, else its OBR-7, else MSH-7 (an OBX-14 that is
    valued but not a valid time is a finding)."""
    rows: list[dict[str, Any]] = []
    obr: Segment | None = None
    sent = None
    n = 0
    for seg in msg.segments:
        if seg.name == "OBR":
            obr = seg
        elif seg.name == "OBX":
            n += 1
            observed = parse_ts(seg.get(14))
            if observed is None and seg.get(14).strip() not in ("", '""'):  # e.g. offset +9900: OBR-7 instead
                outcome.findings.append({"code": "invalid_timestamp", "location": f"OBX^{n}^14",
                                         "severity": "W"})
            observed = observed or (parse_ts(obr.get(7)) if obr else None)
            timed = observed is not None
            if observed is None:
                sent = sent or parse_ts(msg.msh.get(7))
                observed = sent
            row = observation_row(cipher, seg, observed=observed, patient_id=patient_id, message_id=message_id,
                                  outcome=outcome, n=n)
            if row is not None:
                row["_source"] = Source(outcome.findings, n, timed)
                rows.append(row)
    return _number_repeats(rows)


def _number_repeats(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OBX lines of one message with the same code, time and OBX-4 (a report's text and its code, both
    18783-1, no sub-ID) are told apart by their order: the 2nd gets sub-ID ``#2`` (``<OBX-4>#2``), so a
    corrected report replaces each line with its counterpart instead of all of them with one."""
    seen: dict[tuple[Any, ...], int] = {}
    for row in rows:
        key = (row["code"], row["code_system"], row["observed_at"], row["sub_id"])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            row["sub_id"] = f"{row['sub_id']}#{seen[key]}"[-20:]
    return rows


class ObservationWriter:
    """The observation writes of one transaction, kept until :meth:`flush` (call it before a merge moves
    observations between patients, and before the commit)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.messages: list[list[dict[str, Any]]] = []

    def add(self, rows: list[dict[str, Any]]) -> None:
        """One message's rows, applied after everything added before them."""
        if rows:
            self.messages.append(rows)

    def flush(self) -> None:
        if not self.messages:
            return
        messages, self.messages = self.messages, []
        existing, values = self._existing(messages)
        fresh: dict[Key, dict[str, Any]] = {}  # inserted by this flush (not in the database yet)
        inserts: list[dict[str, Any]] = []
        changes: dict[int, dict[str, Any]] = {}  # stored row id -> columns to set
        now = utcnow()
        for rows in messages:
            added: list[tuple[Key, dict[str, Any]]] = []
            for row in rows:
                source = row.pop("_source", None) or Source()
                empty = bool(row.pop("_empty", False))
                key = _key(row)
                if source.timed or row["status"] not in AMEND:
                    target, oid = fresh.get(key), existing.get(key)
                else:  # timed by its own MSH-7: the newest value observed by then
                    target, oid = _newest(values.get(_group(key), []), row["observed_at"], changes,
                                          skip_withdrawn=row["status"] == "C")
                if target is None and oid is None and row["status"] in AMEND and source.findings is not None:
                    source.findings.append({"code": "correction_unmatched" if row["status"] == "C"
                                            else "retraction_unmatched", "location": f"OBX^{source.n}^11",
                                            "severity": "W"})
                _apply(row, target, oid, empty, changes, added, now)
            for key, row in added:
                fresh[key] = row
                inserts.append(row)
                values.setdefault(_group(key), []).append(_Value(key, (1, len(inserts)), row=row))
        self._write(inserts, changes)

    def _existing(self, messages: list[list[dict[str, Any]]]) -> tuple[dict[Key, int],
                                                                         dict[Group, list[_Value]]]:
        """The stored row of each key (the latest by id: the one replaced), and every stored row by group."""
        table = Observation.__table__  # type: ignore[attr-defined]
        patients = {r["patient_id"] for rows in messages for r in rows}
        codes = {r["code"] for rows in messages for r in rows}
        found: dict[Key, int] = {}
        values: dict[Group, list[_Value]] = {}
        for oid, pid, code, system, observed, sub_id, withdrawn in self.session.execute(
                select(table.c.id, table.c.patient_id, table.c.code, table.c.code_system, table.c.observed_at,
                       table.c.sub_id, table.c.withdrawn)
                .where(table.c.patient_id.in_(patients), table.c.code.in_(codes))
                .order_by(table.c.id)).all():
            key = (pid, code, system, observed, sub_id)
            found[key] = oid  # the latest stored row of a key is the one replaced
            values.setdefault(_group(key), []).append(_Value(key, (0, oid), oid=oid,
                                                             stored_withdrawn=bool(withdrawn)))
        return found, values

    def _write(self, inserts: list[dict[str, Any]], changes: dict[int, dict[str, Any]]) -> None:
        table = Observation.__table__  # type: ignore[attr-defined]
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for oid, values in changes.items():
            groups.setdefault(tuple(sorted(values)), []).append({"oid": oid, **values})
        for columns, params in groups.items():
            self.session.execute(update(table).where(table.c.id == bindparam("oid"))
                                 .values({c: bindparam(c) for c in columns}), params)
        if inserts:
            self.session.execute(insert(table), inserts)  # Core executemany


def _key(row: dict[str, Any]) -> Key:
    return row["patient_id"], row["code"], row["code_system"], row["observed_at"], row["sub_id"]


def _group(key: Key) -> Group:
    return key[0], key[1], key[2], key[4]


def _newest(values: list[_Value], sent: datetime | None, changes: dict[int, dict[str, Any]], *,
            skip_withdrawn: bool) -> tuple[dict[str, Any] | None, int | None]:
    """The newest value observed no later than ``sent`` (a correction is not about a value observed after
    it was sent), as (this flush's row, None) or (None, stored row id). A ``C`` skips withdrawn values; a
    withdrawal does not, so that the same retraction sent twice (an engine's resend under a new MSH-10)
    withdraws the newest value again instead of the one before it."""
    best: _Value | None = None
    for value in values:
        observed = value.key[3] or _EARLIEST
        if (sent is not None and observed > sent) or (skip_withdrawn and value.withdrawn(changes)):
            continue
        if best is None or (observed, value.rank) > (best.key[3] or _EARLIEST, best.rank):
            best = value
    if best is None:
        return None, None
    return best.row, best.oid


def _apply(row: dict[str, Any], target: dict[str, Any] | None, oid: int | None, empty: bool,
           changes: dict[int, dict[str, Any]], added: list[tuple[Key, dict[str, Any]]], now: Any) -> None:
    """One row against the value it matched (``target``, a row an earlier message of this batch added, or
    the stored row ``oid``): replace or withdraw it, else a new row. A row without a value (status changed
    to final, ``U``; pending, ``I``) changes only the status of the row it matches: it used to replace that
    row's value with nothing."""
    withdraw = row["status"] in WITHDRAW
    if target is not None:
        oid = None
    if row["feature"] is None and not withdraw and empty and (target is not None or oid is not None):
        if target is not None:
            target.update(status=row["status"], updated_at=now)
        else:
            assert oid is not None
            changes.setdefault(oid, {}).update(status=row["status"], updated_at=now)
        return
    if target is not None:  # a row an earlier message of this batch added
        if withdraw:
            target.update(withdrawn=True, status=row["status"], updated_at=now)
        else:
            target.update({k: row[k] for k in REPLACED}, withdrawn=False, updated_at=now)
        return
    if oid is None:
        row["withdrawn"] = withdraw
        added.append((_key(row), row))
    elif withdraw:
        changes.setdefault(oid, {}).update(withdrawn=True, status=row["status"], updated_at=now)
    else:
        changes.setdefault(oid, {}).update({k: row[k] for k in REPLACED}, withdrawn=False, updated_at=now)
