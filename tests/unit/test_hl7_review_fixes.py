"""HL7 feed defects found in review (2026-12-07), through the real store and mapping path: a line feed in
report text, an out-of-range UTC offset, undecodable bytes under a declared UTF-8, HL7 v2.1 trigger events
in EVN-1, the explicit null "", and the ACK layout of old versions. Each test failed before its fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_segments
from sqlmodel import select

from msgate.config import load_settings
from msgate.hl7.ack import AckError, build_ack
from msgate.hl7.mapping import Outcome, map_messages
from msgate.hl7.msh import read_msh
from msgate.hl7.parse import parse
from msgate.storage import repo_ehr
from msgate.storage.models import Observation, Order
from msgate.storage.store import Store, open_store

ORU_MSH = "MSH|^~\\&|LAB|HOSP|MSGATE|MSGATE|20261201120000+0100||ORU^R01^ORU_R01|{cid}|P|2.5.1"


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    s = open_store(load_settings(home=tmp_path, storage={"min_free_bytes": 0}))
    yield s  # type: ignore[misc]
    s.close()


def _map(store: Store, raw: bytes) -> Outcome:
    stored = store.ingest.store_hl7(raw=raw, header=read_msh(raw).header())
    return map_messages(store, [stored.message_id])[stored.message_id]


def _observations(store: Store) -> dict[str, tuple[str, str]]:
    """code -> (value, OBX-11 status) of every stored observation."""
    with store.db.session() as s:
        return {o.code: (store.cipher.decrypt(o.value_enc, column="observation.value"), o.status)
                for o in s.exec(select(Observation)).all()}


def _patient(store: Store, mrn: str) -> tuple[str | None, str | None, str | None]:
    with store.db.session() as s:
        p = repo_ehr.find_patient(s, store.cipher, [repo_ehr.Identifier(mrn, "HOSP")])
        assert p is not None
        return tuple(store.cipher.decrypt(v, column=f"patient.{c}") if v is not None else None  # type: ignore[return-value]
                     for c, v in (("name", p.name_enc), ("birth_date", p.birth_date_enc), ("sex", p.sex_enc)))


def _codes(outcome: Outcome) -> dict[str, str]:
    return {f["code"]: f["location"] for f in outcome.findings}


# 1. A bare LF inside OBX-5 of a CR-terminated message cut the report and lost OBX-11.
def test_line_feed_in_report_text_keeps_the_text_and_its_status(store: Store) -> None:
    raw = (ORU_MSH.format(cid="LF1") + "\rPID|1||LF1^^^HOSP^MR||LF^PAT\rOBR|1|||X|||20261130100000\r"
           "OBX|1|TX|18783-1^Report^LN||IMPRESSION:\nNo new lesions.\nStable.||||||C\r"
           "OBX|2|NM|101281-4^NfL^LN||12.5|pg/mL|||||F\r").encode()
    outcome = _map(store, raw)
    assert outcome.state == "mapped", outcome
    obs = _observations(store)
    assert obs["18783-1"] == ("IMPRESSION:\nNo new lesions.\nStable.", "C")
    assert obs["101281-4"][0] == "12.5"
    assert _codes(outcome).get("embedded_lf") == "OBX^1"


@pytest.mark.parametrize("end", ["\n", "\r\n"])
def test_lf_and_crlf_terminated_messages_still_split(store: Store, end: str) -> None:
    text = end.join([ORU_MSH.format(cid="E" + str(len(end))), "PID|1||LF2^^^HOSP^MR||LF^PAT",
                     "OBR|1|||X|||20261130100000", "OBX|1|NM|101281-4^NfL^LN||7|pg/mL|||||F"]) + end
    assert [s.name for s in parse(text.encode())] == ["MSH", "PID", "OBR", "OBX"]
    assert _map(store, text.encode()).state == "mapped"
    assert _observations(store)["101281-4"] == ("7.0", "F")


# 2. An out-of-range UTC offset raised ValueError: the message ended internal:ValueError, nothing stored.
def test_out_of_range_utc_offset_is_a_finding_and_the_observations_are_stored(store: Store) -> None:
    raw = (ORU_MSH.format(cid="TZ1") + "\rPID|1||TZ1^^^HOSP^MR||T^Z\rOBR|1|||X|||20261130100000\r"
           "OBX|1|NM|101281-4^NfL^LN||9.5|pg/mL|||||F|||20261130100000+9900\r"
           "OBX|2|NM|14117-6^IgG^LN||0.6||||||F\r").encode()
    outcome = _map(store, raw)
    assert outcome.state == "mapped", outcome
    assert set(_observations(store)) == {"101281-4", "14117-6"}
    assert _codes(outcome).get("invalid_timestamp") == "OBX^1^14"


def test_out_of_range_offset_in_msh7_and_orc9_does_not_fail_the_order(store: Store) -> None:
    raw = ("MSH|^~\\&|HIS|HOSP|||20261201120000+2460||ORM^O01|TZ2|P|2.5.1\rPID|1||TZ2^^^HOSP^MR||T^Z\r"
           "ORC|NW|P1^HIS|||||||20261201110000-9999\rOBR|1|P1^HIS||MRI||20261201100000\r").encode()
    assert _map(store, raw).state == "mapped"
    with store.db.session() as s:
        assert s.exec(select(Order)).one().ordered_at is not None  # from OBR-6 or later fields, not a crash


# 3. Bytes that are not UTF-8 under MSH-18 UNICODE UTF-8 became U+FFFD in the name, without a finding.
def test_invalid_bytes_under_declared_utf8_are_kept_and_reported(store: Store) -> None:
    raw = (b"MSH|^~\\&|ADM|HOSP|MSGATE|MSGATE|20261201120000||ADT^A08|CT4|P|2.5.1||||||UNICODE UTF-8\r"
           b"EVN|A08\rPID|1||CT4^^^HOSP^MR||" + "MÜLLER^ZOË".encode("latin-1") + b"||19800101|F\r")
    outcome = _map(store, raw)
    assert outcome.state == "mapped", outcome
    assert _patient(store, "CT4")[0] == "MÜLLER^ZOË"
    assert _codes(outcome).get("charset_invalid_bytes") == "MSH^1^18"


def test_valid_utf8_under_declared_utf8_has_no_finding(store: Store) -> None:
    raw = (b"MSH|^~\\&|ADM|HOSP|MSGATE|MSGATE|20261201120000||ADT^A08|CT3|P|2.5.1||||||UNICODE UTF-8\r"
           b"EVN|A08\rPID|1||CT3^^^HOSP^MR||" + "MÜLLER^ZOË".encode() + b"||19800101|F\r")
    outcome = _map(store, raw)
    assert _patient(store, "CT3")[0] == "MÜLLER^ZOË" and not outcome.findings


# 4. HL7 v2.1 (MSH-9 without a trigger): the event is EVN-1; the patient was never created.
def test_v21_adt_takes_its_trigger_from_evn(store: Store) -> None:
    raw = (b"MSH|^~\\&|ADM|HOSP|MSGATE|MSGATE|199901011200||ADT|V21A|P|2.1\rEVN|A08|199901011200\r"
           b"PID|1||V21^^^HOSP^MR||OLD^STYLE||19700101|M\r")
    assert read_msh(raw).trigger == "A08"
    outcome = _map(store, raw)
    assert outcome.state == "mapped", outcome
    assert _patient(store, "V21") == ("OLD^STYLE", "19700101", "M")


def test_adt_without_any_trigger_is_an_error_not_a_silent_skip(store: Store) -> None:
    raw = b"MSH|^~\\&|ADM|HOSP|MSGATE|MSGATE|199901011200||ADT|V21B|P|2.1\rPID|1||V21B^^^HOSP^MR||OLD^STYLE\r"
    outcome = _map(store, raw)
    assert (outcome.state, outcome.error) == ("error", "missing_trigger_event")


# 5. The explicit null "" (HL7 v2.5.1 §2.5.3) was stored literally: name '""', sex '"'.
def test_explicit_null_clears_the_demographics(store: Store) -> None:
    msh = "MSH|^~\\&|ADM|HOSP|MSGATE|MSGATE|20261201120000||ADT^{t}|{cid}|P|2.5.1\rEVN|{t}\r"
    assert _map(store, (msh.format(t="A01", cid="N1") + "PID|1||NUL1^^^HOSP^MR||DOE^JANE||19800101|F\r")
                .encode()).state == "mapped"
    outcome = _map(store, (msh.format(t="A08", cid="N2") + 'PID|1||NUL1^^^HOSP^MR||""||""|""\r').encode())
    assert outcome.state == "mapped" and not outcome.findings, outcome
    assert _patient(store, "NUL1") == (None, None, None)


def test_empty_demographics_leave_the_stored_ones(store: Store) -> None:
    msh = "MSH|^~\\&|ADM|HOSP|MSGATE|MSGATE|20261201120000||ADT^{t}|{cid}|P|2.5.1\rEVN|{t}\r"
    _map(store, (msh.format(t="A01", cid="K1") + "PID|1||KEEP1^^^HOSP^MR||DOE^JANE||19800101|F\r").encode())
    _map(store, (msh.format(t="A08", cid="K2") + "PID|1||KEEP1^^^HOSP^MR\r").encode())
    assert _patient(store, "KEEP1") == ("DOE^JANE", "19800101", "F")


def test_explicit_null_elsewhere_is_empty_never_a_number(store: Store) -> None:
    """ORC-2 "" is no placer number (two orders with "" were one order); OBX-5 "" is no value."""
    for cid, placer in (("Q1", "PA"), ("Q2", "PB")):
        raw = (f"MSH|^~\\&|HIS|HOSP|||20261201120000||ORM^O01|{cid}|P|2.5.1\rPID|1||Q^^^HOSP^MR||T^Z\r"
               f'ORC|NW|""||||||\rOBR|1|{placer}^HIS||MRI\r').encode()
        assert _map(store, raw).state == "mapped"
    with store.db.session() as s:
        assert len(s.exec(select(Order)).all()) == 2
    outcome = _map(store, (ORU_MSH.format(cid="Q3") + '\rPID|1||Q^^^HOSP^MR||T^Z\rOBR|1|||X|||20261130100000\r'
                           'OBX|1|NM|101281-4^NfL^LN||""|""|||||F\r').encode())
    assert outcome.state == "mapped" and not [f for f in outcome.findings if f["code"] == "value_not_numeric"]
    assert _observations(store)["101281-4"] == ("", "F")


# 6a. MSH-9.3 (message structure) exists only from v2.3.1: hl7apy STRICT refused the v2.2/v2.3 ACKs.
# 6b. ERR-2 is an ERL (segment^sequence^field^repetition^component): 201 names MSH-9.2 as MSH^1^9^1^2.
@pytest.mark.parametrize("version", ["2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1"])
@pytest.mark.parametrize("error", [None, AckError(201, "MSH^1^9^1^2")])
def test_ack_is_valid_for_its_version(version: str, error: AckError | None) -> None:
    raw = f"MSH|^~\\&|LAB|HOSP|MSGATE|MSGATE|20261201120000||ORU^R01|X1|P|{version}\rPID|1\r".encode()
    ack = build_ack("AR" if error else "AA", read_msh(raw), errors=(error,) if error else ())
    message = Message("ACK", version=version, validation_level=VALIDATION_LEVEL.STRICT)  # v2.2/2.3 ACKs
    message.children = parse_segments(ack, version=version, validation_level=VALIDATION_LEVEL.STRICT)  # name no structure
    message.validate()
    msh9 = ack.split("\r")[0].split("|")[8]
    assert msh9 == ("ACK^R01^ACK" if version not in ("2.2", "2.3") else "ACK^R01")
    if error is not None and version.startswith("2.5"):
        assert ack.split("\r")[2].split("|")[2] == "MSH^1^9^1^2"


def test_v21_ack_has_a_plain_message_type() -> None:
    raw = b"MSH|^~\\&|ADM|HOSP|MSGATE|MSGATE|199901011200||ADT|V21A|P|2.1\rEVN|A08\r"
    assert build_ack("AA", read_msh(raw)).split("\r")[0].split("|")[8] == "ACK"


# 6c. An ACK that echoes non-ASCII text names its character set in MSH-18.
def test_ack_echoing_latin1_text_declares_its_charset() -> None:
    raw = ("MSH|^~\\&|LAB|KLINIKUM MÜNCHEN|MSGATE|MSGATE|20261201120000||ADT^A08|AC1|P|2.5.1||||||8859/1\r"
           "EVN|A08\r").encode("latin-1")
    ack = build_ack("AA", read_msh(raw))
    msh = ack.split("\r")[0].split("|")
    assert msh[5] == "KLINIKUM MÜNCHEN" and msh[17] == "8859/1"
    plain = build_ack("AA", read_msh(b"MSH|^~\\&|LAB|HOSP|||20261201||ADT^A08|AC2|P|2.5.1\rEVN|A08\r"))
    assert len(plain.split("\r")[0].split("|")) == 12  # an ASCII ACK stays as it was


def test_ack_for_undeclared_latin1_names_the_charset_used() -> None:
    raw = ("MSH|^~\\&|LAB|KLINIKUM MÜNCHEN|MSGATE|MSGATE|20261201120000||ADT^A08|AC3|P|2.5.1\r"
           "EVN|A08\r").encode("latin-1")
    msh = read_msh(raw)
    assert msh.charset == "latin-1"
    assert build_ack("AA", msh).split("\r")[0].split("|")[17] == "8859/1"


# A Windows sender's curly apostrophe (0x92) under a declared 8859/1 was stored as the invisible C1
# control U+0092: the name read "O\x92BRIEN", matched no other system's spelling and printed as garbage.
@pytest.mark.parametrize("declared", ["8859/1", "", "ASCII"])
def test_windows_1252_bytes_under_latin1_are_read_as_meant(store: Store, declared: str) -> None:
    raw = (b"MSH|^~\\&|ADM|HOSP|MSGATE|MSGATE|20261201120000||ADT^A01|W" + declared.encode()
           + b"|P|2.5.1||||||" + declared.encode() + b"\rEVN|A01\rPID|1||WIN1" + declared.encode()
           + b"^^^HOSP^MR||O\x92BRIEN^REN\xc9E||19800101|F\r")
    msh = read_msh(raw)
    assert msh.charset == "cp1252" and "charset_c1_as_cp1252" in {f["code"] for f in msh.findings}
    assert _map(store, raw).state == "mapped"
    assert _patient(store, "WIN1" + declared)[0] == "O\u2019BRIEN^REN\u00c9E"


def test_latin1_without_c1_bytes_stays_latin1() -> None:
    msh = read_msh(b"MSH|^~\\&|A|B|||1||ADT^A01|X|P|2.5||||||8859/1\rPID|1||1||REN\xc9E\r")
    assert msh.charset == "latin-1" and not msh.findings
    undefined = read_msh(b"MSH|^~\\&|A|B|||1||ADT^A01|X|P|2.5||||||8859/1\rPID|1||1||A\x81B\r")
    assert undefined.charset == "latin-1"  # 0x81 is undefined in Windows-1252: stays Latin-1
