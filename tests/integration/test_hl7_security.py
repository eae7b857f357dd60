"""Optional TLS on the MLLP port and the source-network allowlist."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hl7_helpers import RawClient, make_store, running_server

from msgate.hl7 import mllp
from msgate.hl7.client import MllpClient
from msgate.hl7.server import Hl7Server

pytestmark = pytest.mark.integration
MSG = b"MSH|^~\\&|LAB|HOSP|||20250101||ADT^A01|T1|P|2.5.1\rPID|1||M1^^^HOSP^MR\r"


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_tls_listener_acknowledges_over_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    store = make_store(tmp_path / "home", tls={"enabled": True, "cert_file": str(cert), "key_file": str(key)})
    with running_server(store) as server:
        ctx = ssl.create_default_context(cafile=str(cert))
        with MllpClient("localhost", server.port, timeout=10, ssl_context=ctx) as client:
            assert client.send(MSG).code == "AA"
    store.close()


def test_source_outside_allowlist_is_closed_without_answer(tmp_path: Path) -> None:
    store = make_store(tmp_path, allowed_networks=["10.99.0.0/16"])
    with running_server(store) as server:
        client = RawClient(server.port, timeout=5)
        client.send(b"\x0b" + MSG + b"\x1c\r")
        with pytest.raises(ConnectionError):
            client.recv_frame()
    store.close()


@pytest.mark.parametrize("networks,warned", [([], True), (["10.0.0.0/8"], False)])
def test_open_listener_warns_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture, networks: list[str],
                                      warned: bool) -> None:
    """docs/security.md: an open default logs a warning at start (the DICOM listener did, HL7 did not)."""
    store = make_store(tmp_path / "home", allowed_networks=networks)
    with caplog.at_level(logging.WARNING, logger="msgate.hl7.server"), running_server(store):
        pass
    store.close()
    warnings = [r for r in caplog.records if r.name == "msgate.hl7.server" and r.levelno == logging.WARNING
                and "open to any source" in r.getMessage()]
    assert len(warnings) == (1 if warned else 0)
    if warned:
        assert "MSGATE_HL7__ALLOWED_NETWORKS" in warnings[0].getMessage()


def test_ipv4_mapped_peer_matches_ipv4_networks() -> None:
    """A dual-stack socket reports an IPv4 peer as ``::ffff:a.b.c.d``; it must match IPv4 networks."""
    server = object.__new__(Hl7Server)  # the allowlist check alone, without a store or a socket
    server.networks = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("fd00::/8")]
    assert server.allowed("127.0.0.1") and server.allowed("::ffff:127.0.0.1")
    assert server.allowed("fd00::5")
    assert not server.allowed("::ffff:10.0.0.1") and not server.allowed("10.0.0.1")
    assert not server.allowed("::1") and not server.allowed("not-an-address")


def test_a_listener_on_all_addresses_takes_ipv4_and_ipv6(tmp_path: Path) -> None:
    """MSGATE_HL7__HOST=:: bound IPv6 only (asyncio sets IPV6_V6ONLY): IPv4 senders could not connect."""
    import socket

    store = make_store(tmp_path, host="::")
    try:
        with running_server(store) as srv:
            for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                with socket.socket(family) as sock:
                    sock.settimeout(5)
                    sock.connect((address, srv.port))
                    sock.sendall(mllp.frame(MSG))
                    assert b"MSA|AA" in sock.recv(4096)
    finally:
        store.close()
