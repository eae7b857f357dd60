"""PS3.8 §9.3.5.1 lets one P-DATA-TF PDU carry the end of one message and the start of the next. The
listener's own C-STORE data phase must answer both, also when the next message is one it hands to
pynetdicom (a C-ECHO), whose first fragment arrived in the PDU that ended the C-STORE."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from dicom_helpers import free_port, write_series
from pydicom import dcmread
from pynetdicom import AE, build_context
from pynetdicom.dsutils import encode
from sqlmodel import select

from msgate.listener import server
from msgate.storage.models import Instance
from msgate.storage.store import Store

pytestmark = [pytest.mark.integration]

MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _element(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _command(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _store_rq(message_id: int, sop_uid: str) -> bytes:
    return _command(_element(0x0002, MR.encode()), _element(0x0100, struct.pack("<H", 0x0001)),
                    _element(0x0110, struct.pack("<H", message_id)), _element(0x0700, struct.pack("<H", 0)),
                    _element(0x0800, struct.pack("<H", 0x0000)), _element(0x1000, sop_uid.encode()))


def _echo_rq(message_id: int) -> bytes:
    return _command(_element(0x0002, VERIFICATION.encode()), _element(0x0100, struct.pack("<H", 0x0030)),
                    _element(0x0110, struct.pack("<H", message_id)), _element(0x0800, struct.pack("<H", 0x0101)))


def _pdv(context_id: int, data: bytes, *, command: bool, last: bool) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, int(command) | (int(last) << 1)) + data


def _pdu(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 0x04, 0x00, len(body)) + body


def _exchange(port: int, pdus: list[bytes], answers: int) -> list[tuple[int, int]]:
    """Send ``pdus`` raw on an association; the (command field, status) of ``answers`` responses."""
    ae = AE(ae_title="PACKSCU")
    ae.requested_contexts = [build_context(MR, EXPLICIT_LE), build_context(VERIFICATION)]
    ae.dimse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="MSGATE")
    assert assoc.is_established
    try:
        ids = {str(cx.abstract_syntax): int(cx.context_id) for cx in assoc.accepted_contexts}
        assert ids == {MR: 1, VERIFICATION: 3}  # the ids the PDUs below were built with
        assoc._reactor_checkpoint.clear()  # keep the reactor off the responses, as send_c_echo() does
        while not assoc._is_paused:
            pass
        for pdu in pdus:
            assoc.dul.socket.socket.sendall(pdu)
        out = []
        for _ in range(answers):
            _, rsp = assoc.dimse.get_msg(block=True)
            out.append((-1, -1) if rsp is None else (type(rsp).__name__, int(rsp.Status)))
        assoc._reactor_checkpoint.set()
        return out
    finally:
        assoc.release()


@pytest.fixture
def port(store: Store):  # noqa: ANN201
    store.settings.dicom.port = free_port()
    store.settings.dicom.quiet_seconds = 30
    ae, _srv, _tracker = server.start(store)
    try:
        yield _srv.server_address[1]
    finally:
        ae.shutdown()


def _instance(tmp_path: Path) -> tuple[str, bytes]:
    ds = dcmread(write_series(tmp_path / "s", count=1)[0])
    return str(ds.SOPInstanceUID), encode(ds, False, True)


def test_echo_starting_in_the_pdu_that_ends_a_store_is_answered(store: Store, port: int, tmp_path: Path) -> None:
    uid, data = _instance(tmp_path)
    packed = _pdu(_pdv(1, _store_rq(1, uid), command=True, last=True), _pdv(1, data, command=False, last=True),
                  _pdv(3, _echo_rq(2), command=True, last=True))
    assert _exchange(port, [packed], 2) == [("C_STORE", 0), ("C_ECHO", 0)]
    with store.db.session() as session:
        assert len(session.exec(select(Instance)).all()) == 1


def test_echo_command_split_across_the_store_end_and_the_next_pdu(store: Store, port: int, tmp_path: Path) -> None:
    uid, data = _instance(tmp_path)
    echo = _echo_rq(2)
    first = _pdu(_pdv(1, _store_rq(1, uid), command=True, last=True), _pdv(1, data, command=False, last=True),
                 _pdv(3, echo[:20], command=True, last=False))
    second = _pdu(_pdv(3, echo[20:], command=True, last=True))
    assert _exchange(port, [first, second], 2) == [("C_STORE", 0), ("C_ECHO", 0)]


def test_two_stores_in_one_pdu_are_both_stored(store: Store, port: int, tmp_path: Path) -> None:
    one, two = _instance(tmp_path / "a"), _instance(tmp_path / "b")
    packed = _pdu(*(_pdv(1, part, command=cmd, last=True)
                    for uid, data in (one, two) for part, cmd in ((_store_rq(1, uid), True), (data, False))))
    assert _exchange(port, [packed], 2) == [("C_STORE", 0), ("C_STORE", 0)]
    with store.db.session() as session:
        assert len(session.exec(select(Instance)).all()) == 2
