"""Association handling against the listener: the maximum PDU announced for ``max_pdu = 0``, bytes that
follow a refused PDU (TLS and HTTP on the plain port, a flood), the transfer syntax chosen from a
context's proposals, and the application context name."""

from __future__ import annotations

import io
import json
import random
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicom_helpers import ListenerProc, listener_env, opened_store, stored_bytes
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    AllTransferSyntaxes,
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    generate_uid,
)

from msgate.config import load_settings
from msgate.listener import dataphase, server
from msgate.storage.store import open_store

pytestmark = [pytest.mark.integration]

SCU = "NEGSCU"  # the one calling AE title the shared listener allows


def _port() -> int:
    """A free port in 44500-44999 (the range these tests may use on shared machines)."""
    for port in random.sample(range(44500, 45000), 500):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 44500-44999")


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ListenerProc]:
    """One ``msgate serve --role dicom`` for the module; only ``NEGSCU`` may associate."""
    home = tmp_path_factory.mktemp("negotiation") / "home"
    port = _port()
    proc = ListenerProc(home, port, listener_env(home, port, MSGATE_DICOM__ALLOWED_AETS=f'["{SCU}"]')).start()
    try:
        yield proc
    finally:
        proc.stop()


def _associate(port: int, contexts: list[tuple[str, list[str]]], **kwargs: Any) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=SCU)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="MSGATE", **kwargs)


def _mr(rows: int, private: bool = False) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.SeriesDescription, ds.InstanceNumber = "MR", "NEG-1", "AX FLAIR", 1
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((rows, rows), np.uint16).tobytes()
    if private:
        block = ds.private_block(0x0043, "ACME MR 1.0", create=True)
        block.add_new(0x10, "DS", "1.5")
        block.add_new(0x11, "US", 512)
    return ds


def _new_lines(proc: ListenerProc, start: int, settle: float = 0.5) -> list[dict[str, Any]]:
    time.sleep(settle)
    out = []
    for line in proc.log().splitlines()[start:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"level": "?", "msg": line})
    return out


def _until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """What the listener answers before it closes the connection (it must close within ``timeout``)."""
    sock.settimeout(timeout)
    got = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def _client_hello() -> bytes:
    """The first flight of a TLS client (a modality set up for DICOM TLS, pointed at the plain port)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="pacs")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --- 1. max_pdu = 0 ---------------------------------------------------------------------------------


def test_max_pdu_zero_announces_the_bound_the_data_phase_accepts(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``max_pdu = 0`` was announced as 0 ("no maximum", PS3.8 D.1), so a pynetdicom sender put a whole
    instance in one P-DATA-TF; the data phase refused it over its own bound (64 MiB): aborted, never
    stored, re-sent forever. The bound (lowered to 1 MiB here) is now what is announced: the sender splits."""
    monkeypatch.setattr(dataphase, "UNLIMITED_PDATA_MAX", 1 << 20)
    store = open_store(load_settings(home=tmp_path / "home", storage={"min_free_bytes": 0}))
    store.settings.dicom.max_pdu = 0
    store.settings.dicom.port = _port()
    ae, srv, _ = server.start(store)
    try:
        ds = _mr(1280)  # 3.1 MiB of pixels: three times the bound
        assoc = _associate(srv.server_address[1], [(MRImageStorage, [ExplicitVRLittleEndian])])
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == 1 << 20
        status = assoc.send_c_store(ds)
        aborted = assoc.is_aborted
        if assoc.is_established:
            assoc.release()
        assert not aborted and status and status.Status == 0x0000
        stored = stored_bytes(store)
        assert str(ds.SOPInstanceUID) in stored
        assert len(stored[str(ds.SOPInstanceUID)][0]) > len(ds.PixelData)
    finally:
        ae.shutdown()
        store.close()


# --- 2. what follows a refused PDU ------------------------------------------------------------------


def _refusal_lines(lines: list[dict[str, Any]]) -> tuple[int, int]:
    errors = [line for line in lines if line.get("level") in ("ERROR", "?")]
    return len(lines), len(errors)


def test_a_tls_handshake_or_http_request_on_the_plain_port_is_refused_with_one_log_line(
        listener: ListenerProc) -> None:
    """Each 6 bytes after the first refused header were read as another PDU header, each logged as an
    ERROR and answered again: one TLS handshake or HTTP health check logged dozens of lines."""
    http = (b"GET /health HTTP/1.1\r\nHost: msgate:11112\r\nUser-Agent: HAProxy-health-check/2.8\r\n"
            b"Accept: */*\r\nConnection: close\r\n\r\n")
    for first_flight, hint in ((_client_hello(), "TLS"), (http, "HTTP")):
        start = len(listener.log().splitlines())
        with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as sock:
            sock.sendall(first_flight)
            answer = _until_closed(sock)
        assert answer[:1] == b"\x07"  # A-ABORT, then the listener closed the connection
        lines = _new_lines(listener, start)
        assert _refusal_lines(lines) == (1, 1), lines
        assert "unknown PDU type" in lines[0]["msg"] and hint in json.dumps(lines[0])
    assert listener.alive


def test_bytes_after_a_refused_pdu_are_dropped_unread_and_the_connection_closed(
        listener: ListenerProc) -> None:
    """An unauthenticated peer declares a 2 MiB A-ASSOCIATE-RQ (refused) and keeps sending: 4 MiB of it
    logged 9,370 ERROR lines. Now: one line, and the connection is closed after at most DISCARD_MAX."""
    start = len(listener.log().splitlines())
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as sock:
        sock.sendall(struct.pack(">BBI", 0x01, 0x00, 2 << 20))
        try:
            for _ in range(64):
                sock.sendall(b"\0" * 65536)
        except OSError:  # reset: the listener closed the connection
            pass
        _until_closed(sock)
    lines = _new_lines(listener, start)
    assert _refusal_lines(lines) == (1, 1), lines[:5]
    assert "PDU longer than this listener accepts" in lines[0]["msg"]
    assert listener.alive


# --- 3. transfer syntax preference ------------------------------------------------------------------


def test_every_known_transfer_syntax_is_still_accepted_and_explicit_vr_comes_first() -> None:
    syntaxes = server.transfer_syntaxes()
    assert sorted(syntaxes) == sorted(str(uid) for uid in AllTransferSyntaxes)
    assert syntaxes[0] == ExplicitVRLittleEndian
    assert syntaxes.index(ImplicitVRLittleEndian) < syntaxes.index(JPEGLosslessSV1)
    assert syntaxes.index(JPEG2000Lossless) < syntaxes.index(JPEGBaseline8Bit)


def test_a_single_syntax_context_is_accepted_for_every_known_syntax(listener: ListenerProc) -> None:
    """No regression: one context per transfer syntax, each proposing only that syntax."""
    syntaxes = [str(uid) for uid in AllTransferSyntaxes]
    assoc = _associate(listener.port, [(MRImageStorage, [uid]) for uid in syntaxes])
    assert assoc.is_established
    try:
        accepted = sorted(str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts)
        assert accepted == sorted(syntaxes) and not assoc.rejected_contexts
    finally:
        assoc.release()


def test_the_lossless_syntax_is_chosen_when_a_context_proposes_several(listener: ListenerProc) -> None:
    """pynetdicom accepts the acceptor's first match: in pydicom's order that was Implicit VR over
    Explicit VR (private elements then stored as UN) and JPEG Baseline over lossless syntaxes."""
    proposals = {
        MRImageStorage: ([ExplicitVRLittleEndian, ImplicitVRLittleEndian], ExplicitVRLittleEndian),
        CTImageStorage: ([JPEG2000Lossless, JPEGBaseline8Bit], JPEG2000Lossless),
        EnhancedMRImageStorage: ([JPEGLosslessSV1, JPEGBaseline8Bit], JPEGLosslessSV1),
        SecondaryCaptureImageStorage: ([JPEGBaseline8Bit, ImplicitVRLittleEndian, RLELossless],
                                       ImplicitVRLittleEndian),
        # DCMTK's second context for an Implicit VR file: taken as Implicit, the file goes unchanged
        SegmentationStorage: ([ExplicitVRBigEndian, ImplicitVRLittleEndian], ImplicitVRLittleEndian),
    }
    assoc = _associate(listener.port, [(cls, syntaxes) for cls, (syntaxes, _) in proposals.items()])
    assert assoc.is_established
    try:
        chosen = {str(cx.abstract_syntax): str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        assert chosen == {cls: want for cls, (_, want) in proposals.items()}
        ds = _mr(8, private=True)
        status = assoc.send_c_store(ds)
        assert status and status.Status == 0x0000
    finally:
        assoc.release()
    with opened_store(listener.home) as store:
        stored = dcmread(io.BytesIO(stored_bytes(store)[str(ds.SOPInstanceUID)][-1]))
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (stored[0x00431010].VR, stored[0x00431011].VR) == ("DS", "US")  # as sent, not UN


# --- 4. application context name --------------------------------------------------------------------


def test_an_unknown_application_context_name_is_rejected(listener: ListenerProc,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """PS3.8 §7.1.1.2: A-ASSOCIATE-RJ, rejected-permanent (1), service user (1),
    application-context-name-not-supported (2). It was accepted."""
    import pynetdicom.acse
    from pynetdicom import evt

    received: list[Any] = []
    monkeypatch.setattr(pynetdicom.acse, "APPLICATION_CONTEXT_NAME", "1.2.3.4.5")
    assoc = _associate(listener.port, [(MRImageStorage, [ExplicitVRLittleEndian])],
                       evt_handlers=[(evt.EVT_PDU_RECV, lambda event: received.append(event.pdu))])
    if assoc.is_established:
        assoc.release()
    assert assoc.is_rejected
    reject = next(pdu for pdu in received if type(pdu).__name__ == "A_ASSOCIATE_RJ")
    assert (reject.result, reject.source, reject.reason_diagnostic) == (1, 1, 2)
    monkeypatch.undo()
    assoc = _associate(listener.port, [(MRImageStorage, [ExplicitVRLittleEndian])])
    assert assoc.is_established  # the DICOM application context name still is
    assoc.release()
