"""DICOM over TLS: server certificate, client certificates required when a CA is configured."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dicom_helpers import opened_store, running_listener, stored_bytes, write_series
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.presentation import build_context

from msgate.results.dicom_send import c_store

pytestmark = [pytest.mark.integration]


def _cert(folder: Path, name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
          ca: bool = False) -> tuple[Path, Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[0].subject if issuer else subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                                     x509.IPAddress(__import__("ipaddress")
                                                                                    .ip_address("127.0.0.1"))]),
                                        critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, cert, key


def _send(port: int, path: Path, context: ssl.SSLContext) -> int | None:
    ae = AE(ae_title="TLSSCU")
    ae.requested_contexts = [build_context("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")]
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="MSGATE", tls_args=(context, "localhost"))
    if not assoc.is_established:
        return None
    status = c_store(assoc, dcmread(path))
    assoc.release()
    return int(status.Status) if status else None


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    ca_crt, _, ca, ca_key = _cert(tmp_path, "ca", ca=True)
    srv_crt, srv_key, _, _ = _cert(tmp_path, "server", issuer=(ca, ca_key))
    cli_crt, cli_key, _, _ = _cert(tmp_path, "client", issuer=(ca, ca_key))
    files = write_series(tmp_path / "tls", count=2)
    env = {"MSGATE_DICOM__TLS__ENABLED": "true", "MSGATE_DICOM__TLS__CERT_FILE": str(srv_crt),
           "MSGATE_DICOM__TLS__KEY_FILE": str(srv_key), "MSGATE_DICOM__TLS__CA_FILE": str(ca_crt)}
    with running_listener(tmp_path, **env) as listener:
        with_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_crt))
        with_cert.load_cert_chain(str(cli_crt), str(cli_key))
        assert _send(listener.port, files[0], with_cert) == 0
        without_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_crt))
        assert _send(listener.port, files[1], without_cert) is None
        assert listener.alive
        with opened_store(listener.home) as store:
            assert len(stored_bytes(store)) == 1
