"""Bad input over real sockets: each gets the right NAK or a clean close, and the server keeps serving."""

from __future__ import annotations

import socket
import time

import pytest
from hl7_helpers import RawClient, err, make_store, msa, running_server

from msgate.hl7 import mllp

pytestmark = pytest.mark.integration
GOOD = b"MSH|^~\\&|LAB|HOSP|MSGATE|MSGATE|20250101120000||ADT^A01^ADT_A01|{cid}|P|2.5.1\rPID|1||M{cid}^^^HOSP^MR||DOE^JANE||19800101|F\r"


def good(cid: str) -> bytes:
    return GOOD.replace(b"{cid}", cid.encode())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    store = make_store(tmp_path_factory.mktemp("bad"), max_message_bytes=4096, idle_timeout=1.0)
    with running_server(store) as srv:
        yield srv
    store.close()


def test_garbage_before_start_block_is_skipped(server) -> None:  # type: ignore[no-untyped-def]
    client = RawClient(server.port)
    client.send(b"\x00\xffjunk\r\n" + mllp.frame(good("G1")))
    assert msa(client.recv_frame())[1:3] == ["AA", "G1"]


@pytest.mark.parametrize("payload,code,echo", [
    (b"PID|1||X\r", "100", ""),  # missing MSH
    (b"\x00\x01\x02\xff\xfe binary junk", "100", ""),
    (b"MSH|^~\\&|LAB|HOSP|||20250101||^|B1|P|2.5.1\r", "101", "B1"),  # bad MSH-9
    (b"MSH|^~\\&|LAB|HOSP|||20250101||ADT^A01|||2.5.1\r", "101", ""),  # missing MSH-10
    (b"MSH|^~\\&|LAB|HOSP|||20250101||ADT^A01|V1|P|3.0\r", "203", "V1"),  # unsupported version
    (b"MSH|^~\\&|LAB|HOSP|||20250101||BAR^P01|T1|P|2.5\r", "200", "T1"),  # unhandled type
    (b"MSH|^~\\&|LAB|HOSP|||20250101||ORU^R30|T2|P|2.5\r", "201", "T2"),  # unhandled event
])
def test_bad_message_gets_ar_with_err_and_connection_stays_open(server, payload: bytes, code: str,
                                                                 echo: str) -> None:  # type: ignore[no-untyped-def]
    client = RawClient(server.port)
    answer = client.exchange(payload)
    fields = msa(answer)
    assert fields[1] == "AR" and fields[2] == echo
    assert code in "|".join(err(answer))
    assert msa(client.exchange(good("after" + code + echo)))[1] == "AA"  # same connection still serves


def test_oversize_frame_gets_ar_104(server) -> None:  # type: ignore[no-untyped-def]
    client = RawClient(server.port)
    big = good("BIG1") + b"NTE|1||" + b"x" * 10_000 + b"\r"
    answer = client.exchange(big)
    assert msa(answer)[1:3] == ["AR", "BIG1"] and "104" in "|".join(err(answer))
    assert msa(client.exchange(good("G2")))[1] == "AA"


def test_oversize_frame_end_block_in_two_reads(server) -> None:  # type: ignore[no-untyped-def]
    """Its 0x1C and 0x0D in separate reads: answered AR at once, and the next frame is not swallowed."""
    client = RawClient(server.port)
    client.send(mllp.SB + good("OV5") + b"NTE|1||" + b"x" * 10_000 + b"\r" + mllp.EB)
    time.sleep(0.3)
    client.send(mllp.CR)
    assert msa(client.recv_frame())[1:3] == ["AR", "OV5"]
    client.send(mllp.frame(good("OV6")))
    assert msa(client.recv_frame())[1:3] == ["AA", "OV6"]


def test_oversize_frame_without_end_block_then_next_frame(server) -> None:  # type: ignore[no-untyped-def]
    """An oversize frame that lost its end block, the next frame in a later read: both answered."""
    client = RawClient(server.port)
    client.send(mllp.SB + good("OV3") + b"NTE|1||" + b"x" * 10_000 + b"\r")
    time.sleep(0.3)
    client.send(mllp.frame(good("OV4")))
    assert msa(client.recv_frame())[1:3] == ["AR", "OV3"]
    assert msa(client.recv_frame())[1:3] == ["AA", "OV4"]


def test_empty_batch_gets_an_empty_batch_answer(server) -> None:  # type: ignore[no-untyped-def]
    client = RawClient(server.port)
    answer = client.exchange(b"BHS|^~\\&|LAB|HOSP|||20250101\rBTS|0\r")
    assert answer.startswith(b"BHS|") and b"\rBTS|0\r" in answer


def test_a_batch_answer_names_the_batch_it_answers(server) -> None:  # type: ignore[no-untyped-def]
    """The answer's BHS-12 (reference batch control id) is the sender's BHS-11, and the sender becomes its
    receiver (BHS-5/6): it used to carry neither, so a sender could not match it to its batch."""
    client = RawClient(server.port)
    batch = (b"FHS|^~\\&|LAB|HOSP|||20250101||||F-77\rBHS|^~\\&|LAB|HOSP|||20250101||||B-77\r"
             + good("BT1") + good("BT2") + b"BTS|2\rFTS|1\r")
    answer = client.exchange(batch).decode()
    lines = {line[:3]: line.split("|") for line in answer.split("\r") if line[:3] in ("FHS", "BHS", "BTS")}
    assert lines["BHS"][4:6] == ["LAB", "HOSP"] and lines["BHS"][11] == "B-77"
    assert lines["FHS"][11] == "F-77" and lines["BTS"][1] == "2"
    assert [line.split("|")[2] for line in answer.split("\r") if line.startswith("MSA")] == ["BT1", "BT2"]


def test_missing_end_block_then_next_frame(server) -> None:  # type: ignore[no-untyped-def]
    client = RawClient(server.port)
    client.send(mllp.SB + good("U1") + mllp.frame(good("U2")))
    first, second = client.recv_frame(), client.recv_frame()
    assert msa(first)[1:3] == ["AR", "U1"]
    assert msa(second)[1:3] == ["AA", "U2"]


def test_cut_mid_message_and_idle_timeout_close_cleanly(server) -> None:  # type: ignore[no-untyped-def]
    cut = RawClient(server.port)
    cut.send(mllp.SB + good("C1")[:30])
    cut.close()
    idle = RawClient(server.port)
    idle.sock.settimeout(5)
    assert idle.sock.recv(10) == b""  # idle timeout (1 s): the server closes
    client = RawClient(server.port)
    assert msa(client.exchange(good("C2")))[1] == "AA"


def test_half_closed_socket_still_gets_its_answer(server) -> None:  # type: ignore[no-untyped-def]
    client = RawClient(server.port)
    client.send(mllp.frame(good("H1")))
    client.sock.shutdown(socket.SHUT_WR)
    assert msa(client.recv_frame())[1:3] == ["AA", "H1"]


def test_slow_sender_byte_by_byte(server) -> None:  # type: ignore[no-untyped-def]
    client = RawClient(server.port)
    for byte in mllp.frame(good("S1")):
        client.send(bytes([byte]))
    assert msa(client.recv_frame())[1:3] == ["AA", "S1"]


def test_duplicate_gets_aa_again(server) -> None:  # type: ignore[no-untyped-def]
    client = RawClient(server.port)
    assert msa(client.exchange(good("D1")))[1] == "AA"
    assert msa(client.exchange(good("D1")))[1] == "AA"
