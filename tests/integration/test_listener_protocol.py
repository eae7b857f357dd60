"""Protocol abuse against a real ``msgate serve --role dicom``: declared PDU lengths, a C-STORE whose
command and data set disagree, requests that are not C-STORE, a command split across contexts."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from dicom_helpers import dataset_part, opened_store, pynd_send, running_listener, stored_bytes, write_series
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

pytestmark = [pytest.mark.integration, pytest.mark.peer]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _associate(port: int, aet: str = "PROTOSCU"):  # type: ignore[no-untyped-def]
    from pynetdicom import AE

    ae = AE(ae_title=aet)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="MSGATE")
    assert assoc.is_established
    return assoc


def _ended(assoc, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    return not assoc.is_established


def _element(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _store_rq(sop_instance: str, message_id: int = 1) -> bytes:
    body = b"".join((_element(0x0002, MRImageStorage.encode()), _element(0x0100, struct.pack("<H", 0x0001)),
                     _element(0x0110, struct.pack("<H", message_id)), _element(0x0700, struct.pack("<H", 0)),
                     _element(0x0800, struct.pack("<H", 0x0000)), _element(0x1000, sop_instance.encode())))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _pdata(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU from (context id, control header, fragment) items."""
    items = b"".join(struct.pack(">IBB", len(data) + 2, cx, control) + data for cx, control, data in pdvs)
    return struct.pack(">BBI", 0x04, 0x00, len(items)) + items


def test_a_declared_length_is_not_allocated_before_it_is_checked(tmp_path: Path) -> None:
    """A 6-byte header that declares a 4 GiB A-ASSOCIATE-RQ (before any access control), and a P-DATA-TF
    far over the maximum PDU we announced: each peer is aborted, the listener's memory does not follow
    the declared lengths, and it keeps serving."""
    good = write_series(tmp_path / "good", count=1)
    with running_listener(tmp_path, MSGATE_DICOM__ALLOWED_AETS='["GOODSCU", "PROTOSCU"]') as listener:
        assert listener.proc is not None
        before = _rss_kb(listener.proc.pid)
        peers = []
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", listener.port), timeout=10)
            sock.sendall(struct.pack(">BBI", 0x01, 0x00, 0xFFFFFFFF))
            peers.append(sock)
        for sock in peers:  # answered (A-ABORT) and closed, not left waiting for 4 GiB
            answer = sock.recv(64)
            assert answer[:1] in (b"\x07", b"")
            sock.close()
        assoc = _associate(listener.port)
        assoc.dul.socket.socket.sendall(struct.pack(">BBI", 0x04, 0x00, 512 << 20) + b"\0" * 4096)
        assert _ended(assoc)
        assert _rss_kb(listener.proc.pid) - before < 100_000  # kB; the declared lengths total 12.5 GiB
        assert listener.alive
        assert pynd_send(listener.port, good, aet="GOODSCU") == [0]
        assert "PDU longer than this listener accepts" in listener.log()


def test_a_command_that_names_another_instance_than_its_data_set_is_refused(tmp_path: Path) -> None:
    """PS3.4 B.2.3: the sender would record the command's instance as stored, the index the data set's.
    A chunked pynetdicom send takes the command's Affected SOP Instance UID from the file meta."""
    files = write_series(tmp_path / "mismatch", count=2)
    other = dcmread(files[0])
    other.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.99999"
    other.save_as(tmp_path / "other.dcm", enforce_file_format=False)
    with running_listener(tmp_path) as listener:
        assert pynd_send(listener.port, [tmp_path / "other.dcm", files[1]], chunked=True) == [0xA900, 0]
        with opened_store(listener.home) as store:
            stored = stored_bytes(store)
        assert list(stored) == [str(dcmread(files[1], stop_before_pixels=True).SOPInstanceUID)]


def test_a_request_other_than_c_store_or_c_echo_aborts_instead_of_a_c_store_answer(tmp_path: Path) -> None:
    """An N-CREATE on a storage context was answered with a C-STORE-RSP (0xC000) as if it were a store."""
    from pydicom.dataset import Dataset

    with running_listener(tmp_path) as listener:
        assoc = _associate(listener.port)
        status, _ = assoc.send_n_create(Dataset(), MRImageStorage, "1.2.826.0.1.3680043.8.498.7")
        assert not status  # no answer: the association was aborted
        assert _ended(assoc)
        assert listener.alive and "store failed" not in listener.log()


def test_a_command_split_across_two_contexts_aborts(tmp_path: Path) -> None:
    """PS3.8 §9.3.5: every fragment of a message is on one presentation context."""
    files = write_series(tmp_path / "split", count=1)
    data = dataset_part(files[0].read_bytes())
    uid = str(dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    with running_listener(tmp_path) as listener:
        assoc = _associate(listener.port)
        mr = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == MRImageStorage)
        echo = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == "1.2.840.10008.1.1")
        command = _store_rq(uid)
        half = len(command) // 2
        assoc.dul.socket.socket.sendall(_pdata((mr, 0x01, command[:half]), (echo, 0x03, command[half:]),
                                               (mr, 0x02, data)))
        assert _ended(assoc)
        time.sleep(0.5)
        with opened_store(listener.home) as store:
            assert stored_bytes(store) == {}
        assert listener.alive
