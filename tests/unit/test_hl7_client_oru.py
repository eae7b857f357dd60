"""MLLP client semantics (AA/CA success, AE Transient, AR Rejected) and the strict ORU builder."""

from __future__ import annotations

import socket
import threading

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from msgate.errors import Rejected, Transient
from msgate.hl7 import mllp
from msgate.hl7.client import MllpClient
from msgate.hl7.oru import DISCLAIMER, Finding, OruInput, build_oru


def _peer(answers: list[str | list[tuple[str, str | None]]]) -> tuple[int, threading.Thread]:
    """Answers each message in turn: a code (one ACK echoing its MSH-10), or several ACK frames
    (code, MSA-2; None: echo this message's MSH-10) sent together."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        d = mllp.Deframer(1 << 20)
        for code in answers:
            frames: list[bytes] = []
            while not frames:
                frames = [e.payload for e in d.feed(conn.recv(65536)) if e.kind == "frame"]
            cid = frames[0].split(b"\r")[0].split(b"|")[9].decode()
            acks = [(code, None)] if isinstance(code, str) else code
            conn.sendall(b"".join(mllp.frame(f"MSH|^~\\&|EHR|H|||2025||ACK|A1|P|2.5.1\rMSA|{c}|{cid if m is None else m}\r"
                                             .encode()) for c, m in acks))
        conn.close()
        srv.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return srv.getsockname()[1], thread


def _result(cid: str = "C1") -> OruInput:
    return OruInput(patient_id="M1", patient_authority="HOSP", accession="ACC1", placer_number="P1",
                    filler_number="F1", sr_sop_instance_uid="1.2.826.0.1.3680043.8.498.1", model_name="msgate-ms",
                    model_version="0.1.0", control_id=cid,
                    findings=(Finding("MS-EDSS", "L", "EDSS estimate", "NM", "3.5", "{score}"),
                              Finding("MS-DX", "L", "MS vs cSVD", "CE", "MS")))


def test_client_reuses_connection_and_reads_msa1() -> None:
    port, thread = _peer(["AA", "CA", "AE", "AR"])
    client = MllpClient("127.0.0.1", port, timeout=5)
    assert client.send(build_oru(_result("C1"))).code == "AA"
    assert client.send(build_oru(_result("C2"))).code == "CA"
    with pytest.raises(Transient):
        client.send(build_oru(_result("C3")))
    with pytest.raises(Rejected):
        client.send(build_oru(_result("C4")))
    client.close()
    thread.join(5)


def test_client_skips_acks_of_other_messages_and_needs_msa2() -> None:
    """A commit ACK followed by an application ACK (or a repeated ACK) answers the first message only:
    the extra frame is not the next message's answer. A late ACK of an earlier message is skipped."""
    port, thread = _peer([[("CA", None), ("AA", None)], "AA", [("AA", "C1"), ("AA", None)], [("AA", "")]])
    client = MllpClient("127.0.0.1", port, timeout=5)
    assert (client.send(build_oru(_result("C1"))).code, client._sock is not None) == ("CA", True)
    ack = client.send(build_oru(_result("C2")))
    assert (ack.code, ack.control_id) == ("AA", "C2")
    assert client.send(build_oru(_result("C3"))).control_id == "C3"
    with pytest.raises(Transient, match="MSA-2"):
        client.send(build_oru(_result("C4")))
    client.close()
    thread.join(5)


def test_client_connection_refused_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(Transient):
        MllpClient("127.0.0.1", port, connect_timeout=1).send(build_oru(_result()))


def test_oru_is_strictly_valid_and_carries_the_contract() -> None:
    text = build_oru(_result())
    msg = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    msg.validate()
    segs = {line[:3]: line.split("|") for line in text.split("\r") if line}
    assert segs["OBR"][18] == "ACC1" and segs["OBR"][25] == "P" and segs["OBR"][2] == "P1"
    obx = [line.split("|") for line in text.split("\r") if line.startswith("OBX")]
    assert all(o[11] == "P" and "0.1.0" in o[17] for o in obx)
    assert obx[-1][5] == "1.2.826.0.1.3680043.8.498.1"
    assert DISCLAIMER in text
