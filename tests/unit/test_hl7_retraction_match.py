"""Which stored value an OBX-11 C/W/D/X applies to. With an OBX-14 or an OBR-7 it is the value of that
time (as before); without either, the time is MSH-7 of the correction itself, so it is the newest value
of the same patient, code, code system and OBX-4 observed by then, in the database or earlier in the same
mapping batch (both paths must agree)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlmodel import select

from msgate.hl7.mapping import map_messages
from msgate.hl7.msh import read_msh
from msgate.storage.models import Hl7Message, Observation
from msgate.storage.store import Store

NFL = "101281-4^NfL^LN"


def _oru(cid: str, sent: str, obx: list[tuple[str, str, str]], obr7: str = "") -> bytes:
    """OBX lines of (value, OBX-11, OBX-14) for NfL."""
    lines = "".join(f"OBX|{n}|NM|{NFL}||{value}|pg/mL|||||{status}|||{time}\r"
                    for n, (value, status, time) in enumerate(obx, 1))
    return (f"MSH|^~\\&|LAB|HOSP|MSGATE|MSGATE|{sent}||ORU^R01^ORU_R01|{cid}|P|2.5.1\r"
            "PID|1||MRN1^^^HOSP^MR||DOE^JANE||19800101|F\r"
            f"OBR|1||FIL{cid}|NFL^NfL^L|||{obr7}\r{lines}").encode()


def _map(store: Store, raws: list[bytes], *, batch: bool) -> list[Hl7Message]:
    ids = [store.ingest.store_hl7(raw=raw, header=read_msh(raw).header()).message_id for raw in raws]
    if batch:
        map_messages(store, ids)
    else:
        for mid in ids:
            map_messages(store, [mid])
    with store.db.session() as session:
        rows = [session.get(Hl7Message, mid) for mid in ids]
    assert all(r is not None and r.mapping_state == "mapped" for r in rows)
    return rows  # type: ignore[return-value]


def _nfl(store: Store) -> list[tuple[str | None, str, bool, datetime | None]]:
    with store.db.session() as session:
        return [(store.cipher.decrypt(o.value_enc, column="observation.value"), o.status, o.withdrawn,
                 o.observed_at)
                for o in session.exec(select(Observation).order_by(Observation.id)).all()]


def _day(d: int) -> datetime:
    return datetime(2026, 1, d, 12, tzinfo=UTC)


def _findings(row: Hl7Message) -> list[tuple[str, str]]:
    return [(f["code"], f["location"]) for f in (row.validation or {}).get("findings", [])]


@pytest.mark.parametrize("batch", [False, True], ids=["one at a time", "one batch"])
def test_without_times_a_retraction_withdraws_the_newest_value(store: Store, batch: bool) -> None:
    """Two NfL values (days 1, 2), then a W: the day-2 value is withdrawn, day 1 stays; a C then
    corrects day 1, the newest value left."""
    rows = _map(store, [_oru("L1", "20260101120000", [("10", "F", "")]),
                        _oru("L2", "20260102120000", [("11", "F", "")]),
                        _oru("L3", "20260103120000", [("11", "W", "")]),
                        _oru("L4", "20260104120000", [("9", "C", "")])], batch=batch)
    assert _nfl(store) == [("9.0", "C", False, _day(1)), ("11.0", "W", True, _day(2))]
    assert [_findings(r) for r in rows] == [[], [], [], []]


@pytest.mark.parametrize("batch", [False, True], ids=["one at a time", "one batch"])
def test_without_times_nothing_observed_after_the_retraction_was_sent_is_withdrawn(store: Store,
                                                                                   batch: bool) -> None:
    """A W sent on day 3 cannot be about a value observed on day 9 (one that reached msgate first)."""
    _map(store, [_oru("L1", "20260101130000", [("10", "F", "20260101120000")]),
                 _oru("L2", "20260109130000", [("11", "F", "20260109120000")]),
                 _oru("L3", "20260103120000", [("10", "W", "")])], batch=batch)
    assert [(v, w) for v, _, w, _ in _nfl(store)] == [("10.0", True), ("11.0", False)]


@pytest.mark.parametrize("batch", [False, True], ids=["one at a time", "one batch"])
def test_with_a_time_a_retraction_withdraws_the_value_of_that_time(store: Store, batch: bool) -> None:
    """OBX-14 (or OBR-7) given: the value of that time, never the newest (the behaviour before)."""
    rows = _map(store, [_oru("L1", "20260101130000", [("10", "F", "20260101120000")]),
                        _oru("L2", "20260102130000", [("11", "F", "")], obr7="20260102120000"),
                        _oru("L3", "20260103120000", [("10", "W", "20260101120000")]),
                        _oru("L4", "20260104120000", [("12", "C", "")], obr7="20260102120000")], batch=batch)
    assert _nfl(store) == [("10.0", "W", True, _day(1)), ("12.0", "C", False, _day(2))]
    assert [_findings(r) for r in rows] == [[], [], [], []]


@pytest.mark.parametrize("batch", [False, True], ids=["one at a time", "one batch"])
def test_a_retraction_with_a_time_that_matches_nothing_is_a_finding(store: Store, batch: bool) -> None:
    """The original timed by OBX-14, the retraction only by OBR-7 (another time): nothing is withdrawn
    (a retraction never guesses when a time is given), but the analyst sees it."""
    rows = _map(store, [_oru("L1", "20260101130000", [("10", "F", "20260101120000")]),
                        _oru("L2", "20260103120000", [("10", "D", "")], obr7="20260101110000")], batch=batch)
    assert [(v, w) for v, _, w, _ in _nfl(store)] == [("10.0", False), ("10.0", True)]
    assert _findings(rows[1]) == [("retraction_unmatched", "OBX^1^11")]


@pytest.mark.parametrize("batch", [False, True], ids=["one at a time", "one batch"])
def test_a_retraction_sent_twice_withdraws_the_same_value_not_the_one_before(store: Store, batch: bool) -> None:
    """An engine resends a retraction under a new MSH-10 (or as W after X): the newest value is withdrawn
    again, and the older value stays; a C that follows corrects the newest value still standing."""
    rows = _map(store, [_oru("L1", "20260101120000", [("10", "F", "")]),
                        _oru("L2", "20260102120000", [("11", "F", "")]),
                        _oru("L3", "20260103120000", [("11", "X", "")]),
                        _oru("L4", "20260104120000", [("11", "W", "")]),
                        _oru("L5", "20260105120000", [("8", "C", "")])], batch=batch)
    assert _nfl(store) == [("8.0", "C", False, _day(1)), ("11.0", "W", True, _day(2))]
    assert [_findings(r) for r in rows] == [[], [], [], [], []]
