"""HL7 feed defects found in review (2026-12-07), over real sockets: HL7 v2.1 events in EVN-1, ERR-2
locations (ERL), the character set of an ACK that echoes non-ASCII text, and the accept ACK in enhanced
mode only as MSH-15 asks. Each test failed before its fix."""

from __future__ import annotations

import pytest
from hl7_helpers import RawClient, err, make_store, msa, running_server, wait_row
from sqlmodel import select

from msgate.hl7 import mllp
from msgate.hl7.msh import read_msh
from msgate.storage import repo_ehr
from msgate.storage.models import Hl7Message, Order

pytestmark = pytest.mark.integration
MSH = "MSH|^~\\&|ADM|HOSP|MSGATE|MSGATE|20261201120000||{typ}|{cid}|P|{ver}{extra}\r"
PID = "PID|1||{mrn}^^^HOSP^MR||DOE^JANE||19800101|F\r"


def message(cid: str, typ: str = "ADT^A08", ver: str = "2.5.1", extra: str = "", body: str = "") -> bytes:
    return (MSH.format(typ=typ, cid=cid, ver=ver, extra=extra) + (body or "EVN|A08\r" + PID.format(mrn=cid))).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    store = make_store(tmp_path_factory.mktemp("review"))
    with running_server(store) as srv:
        yield srv, store
    store.close()


def _row(store, raw: bytes) -> Hl7Message:  # type: ignore[no-untyped-def]
    header = read_msh(raw).header()
    wait_row(store, header, raw)
    with store.db.session() as session:
        return session.exec(select(Hl7Message).where(
            Hl7Message.dedup_index == store.ingest.dedup_key(header, raw))).one()


# 4. HL7 v2.1: MSH-9 'ADT', the event in EVN-1. It got AA, was skipped, and the patient never existed.
def test_v21_adt_with_event_in_evn_creates_the_patient(server) -> None:  # type: ignore[no-untyped-def]
    srv, store = server
    raw = message("V21A", typ="ADT", ver="2.1", body="EVN|A08|199901011200\r" + PID.format(mrn="V21A"))
    assert msa(RawClient(srv.port).exchange(raw))[1:3] == ["AA", "V21A"]
    row = _row(store, raw)
    assert (row.mapping_state, row.trigger) == ("mapped", "A08")
    with store.db.session() as session:
        assert repo_ehr.find_patient(session, store.cipher, [repo_ehr.Identifier("V21A", "HOSP")]) is not None


def test_v21_orm_without_trigger_is_an_order(server) -> None:  # type: ignore[no-untyped-def]
    srv, store = server
    raw = message("V21O", typ="ORM", ver="2.1", body=PID.format(mrn="V21O") + "ORC|NW|PL21^HIS\rOBR|1|PL21^HIS||MRI\r")
    assert msa(RawClient(srv.port).exchange(raw))[1:3] == ["AA", "V21O"]
    row = _row(store, raw)
    assert row.mapping_state == "mapped"
    with store.db.session() as session:
        assert session.exec(select(Order).where(Order.message_id == row.id)).first() is not None


@pytest.mark.parametrize("ver,location", [("2.5.1", "MSH^1^9^1^2"), ("2.3", "MSH^1^9")])
def test_adt_without_any_event_is_refused_with_201(server, ver: str, location: str) -> None:  # type: ignore[no-untyped-def]
    srv, _ = server
    raw = message("NOEV" + ver, typ="ADT", ver=ver, body=PID.format(mrn="NOEV"))
    answer = RawClient(srv.port).exchange(raw)
    assert msa(answer)[1] == "AR"
    fields = err(answer)
    if ver == "2.5.1":
        assert fields[2:4] == [location, "201^Unsupported event code^HL70357"]
    else:  # ERR-1 (ELD): segment^sequence^field^code
        assert fields[1].startswith(location + "^201&")


# 6b. ERR-2 is an ERL (segment^sequence^field^repetition^component): MSH^1^9^2 named repetition 2.
@pytest.mark.parametrize("typ,location,code", [("ORU^R30", "MSH^1^9^1^2", "201"), ("BAR^P01", "MSH^1^9^1^1", "200")])
def test_err_locations_are_erl(server, typ: str, location: str, code: str) -> None:  # type: ignore[no-untyped-def]
    srv, _ = server
    answer = RawClient(srv.port).exchange(message("ERL" + code, typ=typ))
    assert msa(answer)[1] == "AR" and err(answer)[2:4] == [location, f"{code}^{'Unsupported event code' if code == '201' else 'Unsupported message type'}^HL70357"]


# 6c. An ACK echoing a Latin-1 MSH-4 had no MSH-18.
@pytest.mark.parametrize("msh18", ["8859/1", ""])
def test_ack_echoing_latin1_names_its_charset(server, msh18: str) -> None:  # type: ignore[no-untyped-def]
    srv, _ = server
    raw = ("MSH|^~\\&|LAB|KLINIKUM MÜNCHEN|MSGATE|MSGATE|20261201120000||ADT^A08|AC" + msh18[-1:] + "|P|2.5.1||||||"
           + msh18 + "\rEVN|A08\rPID|1||ACS1^^^HOSP^MR||X^Y\r").encode("latin-1")
    answer = RawClient(srv.port).exchange(raw)
    header = answer.split(b"\r")[0].split(b"|")
    assert header[5] == "KLINIKUM MÜNCHEN".encode("latin-1") and header[17] == b"8859/1"
    assert msa(answer)[1] == "AA"


# 6d. In enhanced mode a refusal went out as CR/CE even when MSH-15 said NE (no accept ACK).
def test_enhanced_ne_refusal_sends_no_commit_ack(server) -> None:  # type: ignore[no-untyped-def]
    srv, _ = server
    client = RawClient(srv.port)
    client.send(mllp.frame(message("NE1", ver="9.9", extra="|||NE|NE")))
    # answers come in order: the next answer on this connection is that of the next message
    assert msa(client.exchange(message("NE2")))[1:3] == ["AA", "NE2"]


def test_enhanced_ne_al_refusal_gets_the_application_reject(server) -> None:  # type: ignore[no-untyped-def]
    srv, _ = server
    answer = RawClient(srv.port).exchange(message("NE3", typ="BAR^P01", extra="|||NE|AL"))
    assert msa(answer)[1:3] == ["AR", "NE3"] and err(answer)[3].startswith("200^")


@pytest.mark.parametrize("accept", ["AL", "ER"])
def test_enhanced_al_er_refusal_gets_the_commit_reject(server, accept: str) -> None:  # type: ignore[no-untyped-def]
    srv, _ = server
    answer = RawClient(srv.port).exchange(message("CR" + accept, typ="BAR^P01", extra=f"|||{accept}|NE"))
    assert msa(answer)[1:3] == ["CR", "CR" + accept]


def test_original_mode_refusal_is_unchanged(server) -> None:  # type: ignore[no-untyped-def]
    srv, _ = server
    answer = RawClient(srv.port).exchange(message("OR1", typ="BAR^P01"))
    assert msa(answer)[1:3] == ["AR", "OR1"]


# The message row recorded CA (shown by `messages list` and `trace`) for an enhanced-mode message whose
# MSH-15 asked for no accept ACK on success (NE, ER): none was sent.
@pytest.mark.parametrize(("accept", "recorded"), [("NE", None), ("ER", None), ("AL", "CA"), ("SU", "CA")])
def test_the_recorded_ack_is_the_one_sent(server, accept: str, recorded: str | None) -> None:  # type: ignore[no-untyped-def]
    srv, store = server
    cid = "REC" + accept
    raw = message(cid, extra=f"|||{accept}|NE")
    client = RawClient(srv.port)
    client.send(mllp.frame(raw))
    if recorded is None:  # nothing comes for it: the next answer on this connection is the next message's
        assert msa(client.exchange(message(cid + "X")))[1:3] == ["AA", cid + "X"]
    else:
        assert msa(client.recv_frame())[1:3] == [recorded, cid]
    row = _row(store, raw)
    assert row.mapping_state == "mapped" and row.ack_code == recorded
