"""A lab's correction or retraction (OBX-11 C/W/D/X) whose result has no OBX-14 and no OBR-7, over real
MLLP on both backends. Each message's time then falls back to its own MSH-7, so matching by time never
found the original: a W stored a second, withdrawn row and left the value feeding the model, and a C sent
after the study day was not in the study's snapshot. Each test failed before the fix."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import make_settings
from hl7_helpers import RawClient, msa, running_server, wait_row
from sqlmodel import select

from msgate.hl7.msh import read_msh
from msgate.storage import keyring, repo_ehr
from msgate.storage.models import Hl7Message, Observation
from msgate.storage.store import Store, open_store

pytestmark = pytest.mark.integration

NFL, IGG = "101281-4^NfL^LN", "14117-6^IgG index^LN"
STUDY_DAY_END = datetime(2026, 1, 3, 23, 59, 59, tzinfo=UTC)


@pytest.fixture
def feed(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Iterator[tuple[Store, int]]:
    """A store on ``backend`` behind an HL7 server on port 0, and that server's port."""
    pg = request.getfixturevalue("pg_url") if backend == "postgres" else None
    home = tmp_path / "home"
    if backend == "postgres":
        keyring.init(home / "keys" / "keyring.json")
    store = open_store(make_settings(home, backend, pg, hl7={"port": 0}, metrics={"enabled": False}))
    try:
        with running_server(store) as server:
            yield store, server.port
    finally:
        store.close()


def _send(store: Store, port: int, raw: bytes) -> Hl7Message:
    """Send one message over MLLP, wait until it is mapped, and return its row."""
    client = RawClient(port)
    try:
        assert msa(client.exchange(raw))[1] == "AA"
    finally:
        client.close()
    header = read_msh(raw).header()
    wait_row(store, header, raw)
    with store.db.session() as session:
        row = session.exec(select(Hl7Message).where(
            Hl7Message.dedup_index == store.ingest.dedup_key(header, raw))).one()
    assert row.mapping_state == "mapped", row.mapping_error
    return row


def _a04(cid: str = "A1") -> bytes:
    return (f"MSH|^~\\&|HIS|HOSP|MSGATE|MSGATE|20260101120000||ADT^A04|{cid}|P|2.5.1\r"
            "EVN|A04|20260101120000\rPID|1||MRN1^^^HOSP^MR||DOE^JANE||19800101|F\r").encode()


def _oru(cid: str, sent: str, obx: list[tuple[str, str, str]]) -> bytes:
    """An ORU whose OBX lines carry no OBX-14 and whose OBR has no OBR-7: each value's time is MSH-7."""
    lines = "".join(f"OBX|{n}|NM|{code}||{value}|{'pg/mL' if code == NFL else ''}|||||{status}\r"
                    for n, (code, value, status) in enumerate(obx, 1))
    return (f"MSH|^~\\&|LAB|HOSP|MSGATE|MSGATE|{sent}||ORU^R01^ORU_R01|{cid}|P|2.5.1\r"
            "PID|1||MRN1^^^HOSP^MR||DOE^JANE||19800101|F\r"
            f"OBR|1||FIL{cid}|NFL^NfL^L\r{lines}").encode()


def _snapshot(store: Store, at: datetime) -> dict[str, object]:
    with store.db.session() as session:
        patient = repo_ehr.find_patient(session, store.cipher, [repo_ehr.Identifier("MRN1", "HOSP")])
        assert patient is not None
        return repo_ehr.snapshot(session, store.cipher, patient, at)


def _rows(store: Store, code: str) -> list[tuple[str | None, str, bool, datetime | None]]:
    with store.db.session() as session:
        return [(store.cipher.decrypt(o.value_enc, column="observation.value"), o.status, o.withdrawn,
                 o.observed_at)
                for o in session.exec(select(Observation).where(Observation.code == code)
                                      .order_by(Observation.id)).all()]


def _codes(row: Hl7Message) -> list[tuple[str, str]]:
    return [(f["code"], f["location"]) for f in (row.validation or {}).get("findings", [])]


@pytest.mark.parametrize("status", ["W", "D", "X"])
def test_a_retraction_without_times_withdraws_the_value(feed: tuple[Store, int], status: str) -> None:
    """The reviewer's scenario: NfL final on day 2, the same result retracted on day 3. It left two rows,
    the original active, and the snapshot still had the retracted NfL."""
    store, port = feed
    _send(store, port, _a04())
    _send(store, port, _oru("L1", "20260102120000", [(NFL, "12.0", "F")]))
    assert _snapshot(store, STUDY_DAY_END)["nfl"]["value"] == 12.0  # type: ignore[index]
    retraction = _send(store, port, _oru("L2", "20260103120000", [(NFL, "12.0", status)]))
    assert _snapshot(store, STUDY_DAY_END)["nfl"] is None
    assert [(s, w) for _, s, w, _ in _rows(store, "101281-4")] == [(status, True)]
    assert _codes(retraction) == []


def test_a_correction_sent_after_the_study_day_is_in_the_snapshot(feed: tuple[Store, int]) -> None:
    """NfL observed on day 2 (study on day 3) and corrected on day 10: the correction replaces the value
    observed on day 2, so the study's snapshot has the corrected value, still observed on day 2."""
    store, port = feed
    _send(store, port, _a04())
    _send(store, port, _oru("L1", "20260102120000", [(NFL, "12.0", "F")]))
    correction = _send(store, port, _oru("L2", "20260110120000", [(NFL, "15.0", "C")]))
    nfl = _snapshot(store, STUDY_DAY_END)["nfl"]
    assert nfl is not None
    assert (nfl["value"], nfl["status"], nfl["observed_at"]) == (  # type: ignore[index]
        15.0, "C", datetime(2026, 1, 2, 12, tzinfo=UTC))
    assert _rows(store, "101281-4") == [("15.0", "C", False, datetime(2026, 1, 2, 12, tzinfo=UTC))]
    assert _codes(correction) == []


def test_a_retraction_that_matches_nothing_is_a_finding_and_harms_nothing(feed: tuple[Store, int]) -> None:
    """A W for a code this patient has no value of: the message is mapped with a finding at OBX-11 for
    the interface analyst, the patient's NfL stays, and a C that matches nothing is stored as a value."""
    store, port = feed
    _send(store, port, _a04())
    _send(store, port, _oru("L1", "20260102120000", [(NFL, "12.0", "F")]))
    retraction = _send(store, port, _oru("L2", "20260103080000", [(NFL, "12.0", "F"), (IGG, "0.7", "W")]))
    assert ("retraction_unmatched", "OBX^2^11") in _codes(retraction)
    correction = _send(store, port, _oru("L3", "20260103090000", [(IGG, "0.8", "C")]))
    assert _codes(correction) == [("correction_unmatched", "OBX^1^11")]
    snap = _snapshot(store, STUDY_DAY_END)
    assert snap["nfl"]["value"] == 12.0  # type: ignore[index]
    assert snap["igg_index"]["value"] == 0.8  # type: ignore[index]
    assert [(v, s, w) for v, s, w, _ in _rows(store, "101281-4")] == [("12.0", "F", False)] * 2
