"""Peers that stop talking, against a real ``msgate serve --role dicom``: a TCP connection to the TLS port
that never sends its ClientHello (a port scanner, a probe, a half-open flow) must not hold up the other
senders' handshakes, and is closed after the ACSE timeout; a sender cut off in the middle of a PDU is
aborted after the network timeout, so it no longer holds one of ``max_associations``."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dicom_helpers import (
    dataset_part,
    opened_store,
    running_listener,
    sop_uid,
    stored_bytes,
    storescu,
    write_series,
)
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from msgate.results.dicom_send import c_store

pytestmark = [pytest.mark.integration, pytest.mark.peer]

ACSE_TIMEOUT = 3.0
NETWORK_TIMEOUT = 2.0


def _cert(folder: Path, name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
          ca: bool = False) -> tuple[Path, Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for 127.0.0.1 (self-signed without ``issuer``), its key, as files and objects."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[0].subject if issuer else subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, cert, key


def _tls_env(tmp_path: Path) -> dict[str, str]:
    cert, key, _, _ = _cert(tmp_path, "server")
    return {"MSGATE_DICOM__TLS__ENABLED": "true", "MSGATE_DICOM__TLS__CERT_FILE": str(cert),
            "MSGATE_DICOM__TLS__KEY_FILE": str(key)}


def _client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _associate(port: int, tls: ssl.SSLContext | None = None):  # type: ignore[no-untyped-def]
    """A pynetdicom association (MR storage + Verification), every timeout 5 s, and how long it took."""
    from pynetdicom import AE

    ae = AE(ae_title="STALLSCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 5  # TLS handshake too
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="MSGATE", tls_args=(tls, None) if tls else None)
    return assoc, time.monotonic() - started


def _closed_by_peer(sock: socket.socket, within: float) -> float | None:
    """Seconds until the other end closed ``sock`` (EOF or reset), or None if it was still open after
    ``within`` seconds; whatever arrives before the close (an A-ABORT, a TLS alert) is read and dropped."""
    started = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            sock.settimeout(max(0.01, within - (time.monotonic() - started)))
    except TimeoutError:
        return None
    except OSError:
        pass
    return time.monotonic() - started


def _log_records(listener) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    records = []
    for line in listener.log().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _stall_mid_pdu(assoc) -> socket.socket:  # type: ignore[no-untyped-def]
    """Take the association's socket from pynetdicom and send a P-DATA-TF header that announces 1000
    bytes, then 10 of them, then nothing: a sender switched off (no FIN) in the middle of a PDU."""
    sock = assoc.dul.socket.socket
    assoc.dul.socket.socket = None  # keep pynetdicom's reactor off it
    sock.sendall(struct.pack(">BBL", 0x04, 0x00, 1000) + b"\x00" * 10)
    return sock


def test_a_silent_connection_does_not_hold_up_tls_handshakes(tmp_path: Path) -> None:
    """An idle TCP connection and one that stops inside its ClientHello: a TLS C-ECHO is established at
    once, both silent connections are closed after the ACSE timeout with one PHI-free log line each
    (peer address only), and stopping the listener is not held up by a handshake in progress."""
    env = {**_tls_env(tmp_path), "MSGATE_DICOM__ACSE_TIMEOUT": str(ACSE_TIMEOUT)}
    with running_listener(tmp_path, **env) as listener:
        assoc, _ = _associate(listener.port, _client_tls())  # warm: the first association imports lazily
        assert assoc.is_established
        assoc.release()
        idle = socket.create_connection(("127.0.0.1", listener.port))
        partial = socket.create_connection(("127.0.0.1", listener.port))
        partial.sendall(b"\x16\x03\x01\x02\x00\x01")  # the first bytes of a ClientHello, then nothing
        time.sleep(0.3)
        opened = time.monotonic()
        assoc, took = _associate(listener.port, _client_tls())
        assert assoc.is_established, "TLS association not established while a silent connection is open"
        assert took < 2.0, f"TLS association took {took:.1f} s behind a silent connection"
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        for sock in (idle, partial):
            closed = _closed_by_peer(sock, within=ACSE_TIMEOUT + 3 - (time.monotonic() - opened))
            assert closed is not None, "a connection that never completed its handshake was left open"
            sock.close()
        assert time.monotonic() - opened >= ACSE_TIMEOUT - 0.5  # not cut before its time either
        handshakes = [r for r in _log_records(listener)
                      if "TLS handshake" in str(r.get("msg")) and "timed out" in str(r.get("reason"))]
        assert len(handshakes) == 2, handshakes
        for record in handshakes:
            assert record["peer"] == "127.0.0.1"
            assert set(record) <= {"ts", "level", "logger", "msg", "peer", "reason", "elapsed_s"}
        pending = socket.create_connection(("127.0.0.1", listener.port))  # a handshake still waiting
        time.sleep(0.3)
        stopping = time.monotonic()
        listener.stop()
        assert time.monotonic() - stopping < 1.5, "stop waited for a pending handshake"  # 2.7 s if it did
        pending.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_peers_stalled_mid_pdu_are_aborted_and_free_their_slots(tmp_path: Path, tls: bool) -> None:
    """``max_associations`` 2: two senders stall inside a P-DATA-TF, the first after an acknowledged
    C-STORE. Both are aborted after the network timeout (logged), the acknowledged instance is stored,
    the partial one is not, and a third sender (DCMTK storescu) gets through."""
    files = write_series(tmp_path / "series", count=2)
    env = {"MSGATE_DICOM__NETWORK_TIMEOUT": str(NETWORK_TIMEOUT), "MSGATE_DICOM__MAX_ASSOCIATIONS": "2",
           "MSGATE_DICOM__ACSE_TIMEOUT": "1", **(_tls_env(tmp_path) if tls else {})}
    with running_listener(tmp_path, **env) as listener:
        # the helper's port probe (connect, close) holds an acceptor slot until pynetdicom's ACSE wait ends
        time.sleep(1.5)
        context = _client_tls() if tls else None
        first, _ = _associate(listener.port, context)
        assert first.is_established
        status = c_store(first, dcmread(files[0]))
        assert status is not None and int(status.Status) == 0  # acknowledged before the stall
        second, _ = _associate(listener.port, context)
        assert second.is_established
        stalled = [_stall_mid_pdu(first), _stall_mid_pdu(second)]
        started = time.monotonic()
        for sock in stalled:
            closed = _closed_by_peer(sock, within=NETWORK_TIMEOUT + 4 - (time.monotonic() - started))
            assert closed is not None, "an association stalled mid-PDU was not aborted"
            sock.close()
        assert time.monotonic() - started >= NETWORK_TIMEOUT - 0.5
        time.sleep(0.5)  # the association threads end just after the connection is closed
        if tls:
            assert _send(listener.port, [files[1]], context) == [0]
        else:
            done = storescu(listener.port, [files[1]], timeout=30)
            assert done.returncode == 0, done.stderr[-2000:]
        stalls = [r for r in _log_records(listener)
                  if r.get("msg") == "association aborted: peer stalled mid-PDU"]
        assert len(stalls) == 2, [r.get("msg") for r in _log_records(listener)][-20:]
        assert all(r["peer"] == "127.0.0.1" for r in stalls)
        listener.stop()
        with opened_store(listener.home) as store:
            assert sorted(stored_bytes(store)) == sorted(sop_uid(f) for f in files)


def _send(port: int, files: list[Path], context: ssl.SSLContext | None) -> list[int | None]:
    """C-STORE ``files`` on one new pynetdicom association; the status of each (None: no answer)."""
    assoc, _ = _associate(port, context)
    if not assoc.is_established:
        return [None] * len(files)
    statuses = []
    for path in files:
        status = c_store(assoc, dcmread(path))
        statuses.append(int(status.Status) if status else None)
    assoc.release()
    return statuses


def _element(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _store_rq(sop_instance: str) -> bytes:
    body = b"".join((_element(0x0002, MRImageStorage.encode()), _element(0x0100, struct.pack("<H", 0x0001)),
                     _element(0x0110, struct.pack("<H", 1)), _element(0x0700, struct.pack("<H", 0)),
                     _element(0x0800, struct.pack("<H", 0x0000)), _element(0x1000, sop_instance.encode())))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _pdata(context_id: int, control: int, data: bytes) -> bytes:
    item = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", 0x04, 0x00, len(item)) + item


def test_a_slow_sender_that_keeps_sending_is_not_cut(tmp_path: Path) -> None:
    """The timeout is on silence, not on the whole PDU: a data set PDU sent in three parts 1.2 s apart
    (2.4 s in all, over the 2 s network timeout) is stored and acknowledged."""
    path = write_series(tmp_path / "series", count=1)[0]
    with running_listener(tmp_path, MSGATE_DICOM__NETWORK_TIMEOUT=str(NETWORK_TIMEOUT)) as listener:
        assoc, _ = _associate(listener.port)
        assert assoc.is_established
        context_id = next(cx.context_id for cx in assoc.accepted_contexts
                          if cx.abstract_syntax == MRImageStorage)
        sock = assoc.dul.socket.socket
        assoc.dul.socket.socket = None
        sock.sendall(_pdata(context_id, 0x03, _store_rq(str(dcmread(path).SOPInstanceUID))))
        pdu = _pdata(context_id, 0x02, dataset_part(path.read_bytes()))
        third = len(pdu) // 3
        for part in (pdu[:third], pdu[third:2 * third], pdu[2 * third:]):
            sock.sendall(part)
            time.sleep(1.2)
        sock.settimeout(10)
        answer = sock.recv(65536)
        assert answer[:1] == b"\x04", answer[:1]  # the C-STORE-RSP (P-DATA-TF), not an A-ABORT or a close
        status_element = struct.pack("<HHI", 0x0000, 0x0900, 2)
        assert answer[answer.index(status_element) + 8:][:2] == b"\x00\x00"
        sock.close()
        listener.stop()
        with opened_store(listener.home) as store:
            assert sorted(stored_bytes(store)) == [sop_uid(path)]


def test_a_refused_client_certificate_is_logged_without_its_subject(tmp_path: Path) -> None:
    """Client certificates required (``ca_file``): a sender without one, and one whose certificate another
    CA signed, get no association, each with one log line naming the peer address and OpenSSL's reason
    code, never the certificate's subject; a sender with a valid certificate still stores."""
    ca_crt, _, ca, ca_key = _cert(tmp_path, "ca", ca=True)
    srv_crt, srv_key, _, _ = _cert(tmp_path, "server", issuer=(ca, ca_key))
    cli_crt, cli_key, _, _ = _cert(tmp_path, "client", issuer=(ca, ca_key))
    _, _, rogue, rogue_key = _cert(tmp_path, "rogue-ca", ca=True)
    bad_crt, bad_key, _, _ = _cert(tmp_path, "SUBJECT^NAME", issuer=(rogue, rogue_key))
    path = write_series(tmp_path / "series", count=1)[0]
    env = {"MSGATE_DICOM__TLS__ENABLED": "true", "MSGATE_DICOM__TLS__CERT_FILE": str(srv_crt),
           "MSGATE_DICOM__TLS__KEY_FILE": str(srv_key), "MSGATE_DICOM__TLS__CA_FILE": str(ca_crt)}
    with running_listener(tmp_path, **env) as listener:
        refused = []
        for cert_key in (None, (bad_crt, bad_key)):
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_crt))
            context.check_hostname = False
            if cert_key:
                context.load_cert_chain(str(cert_key[0]), str(cert_key[1]))
            assoc, _ = _associate(listener.port, context)
            refused.append(assoc.is_established)
        assert refused == [False, False]
        good = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_crt))
        good.check_hostname = False
        good.load_cert_chain(str(cli_crt), str(cli_key))
        assert _send(listener.port, [path], good) == [0]
        time.sleep(0.3)
        records = [r for r in _log_records(listener) if r.get("level") == "WARNING"
                   and r.get("msg") == "TLS handshake not completed: connection closed"]
        assert len(records) == 2, records
        assert all(r["peer"] == "127.0.0.1" and str(r["reason"]).isupper() for r in records), records
        assert "SUBJECT" not in listener.log()

