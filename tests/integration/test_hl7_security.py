"""Optional TLS on the MLLP port and the source-network allowlist."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hl7_helpers import RawClient, make_store, running_server

from msgate.hl7.client import MllpClient

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
