"""TLS settings: a listener's (:class:`TlsSettings`) and an outbound link's (:class:`ClientTlsSettings`),
the client context the latter makes, and the operator text for a failed handshake.

Outbound TLS is what PS3.15 Annex B.9 (BCP 195 secure transport) and IHE ATNA ask of the links to the
PACS (C-STORE) and to the interface engine (MLLP over TLS): TLS 1.2 or later, the peer's certificate
checked against a CA, and for mutual TLS a client certificate of our own.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from msgate.errors import Transient

MIN_VERSION = ssl.TLSVersion.TLSv1_2
# OpenSSL reasons for a handshake that met something other than TLS (a plaintext DICOM or MLLP peer
# answering our ClientHello with its own bytes)
NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                             "UNKNOWN_PROTOCOL", "HTTP_REQUEST", "UNEXPECTED_RECORD", "RECORD_TOO_LARGE"})

SESSION_CLOSED = "TLS: the peer closed the session before answering (does it require a client certificate?)"


class Section(BaseModel):
    """A settings section; unknown keys are errors, so a typo in the TOML file is named. (Here rather than
    in msgate.config, which imports it back, so the TLS sections need no import of msgate.config.)"""

    model_config = ConfigDict(extra="forbid")


def _no_password() -> bytes:
    """An encrypted key is refused rather than prompting on a terminal a service does not have."""
    return b""


def _load_tls(load: Any, problem: str) -> None:
    """Load a TLS file the way the listeners do (ssl.create_default_context), so a file that is readable
    but not a usable certificate or key is refused here, naming the setting, instead of crashing the role."""
    try:
        load(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    except ssl.SSLError as exc:
        raise ValueError(f"{problem} ({exc.reason or exc.strerror or 'unreadable'})") from None


def _readable(value: Path) -> None:
    if not value.is_file() or not os.access(value, os.R_OK):
        raise ValueError(f"not a readable file: {value}")


class TlsSettings(Section):
    """Optional TLS for a listener. With ``ca_file`` set, client certificates are required.

    ``enabled`` needs ``cert_file`` and ``key_file``; a file set while ``enabled`` is false is refused (it
    would otherwise give a plaintext listener that looks configured for TLS). Each file must be readable.
    """

    enabled: bool = False
    cert_file: Path | None = Field(None, validate_default=True)
    key_file: Path | None = Field(None, validate_default=True)
    ca_file: Path | None = None

    @field_validator("cert_file", "key_file", "ca_file")
    @classmethod
    def _usable_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        enabled = info.data.get("enabled", False)
        if value is None:
            if enabled and info.field_name != "ca_file":
                raise ValueError("is required when TLS is enabled")
            return value
        if not enabled:
            raise ValueError("is set while TLS is off (enabled = false), which would leave the listener "
                             "plaintext; set enabled = true or remove the file setting")
        _readable(value)
        if info.field_name == "key_file" and isinstance(info.data.get("cert_file"), Path):
            _load_tls(lambda ctx: ctx.load_cert_chain(info.data["cert_file"], value, password=_no_password),
                      f"{value} is not an unencrypted PEM private key that matches cert_file")
        elif info.field_name != "key_file":
            _load_tls(lambda ctx: ctx.load_verify_locations(cafile=value),
                      f"{value} holds no PEM certificate")
        return value


class ClientTlsSettings(Section):
    """TLS for an outbound link (a ``[[pacs]]`` destination, ``[hl7_out]``).

    The peer's certificate is always verified: against ``ca_file`` when set, else the system trust
    store. ``check_hostname`` (default on) also matches it to the configured host, or to ``server_name``
    when set (also sent as SNI: for a host given as an IP address or an alias the certificate does not
    name). ``cert_file`` + ``key_file`` (both or neither) are the client certificate for mutual TLS. A
    file or ``server_name`` set while ``enabled`` is false is refused: results would go out in plaintext
    on a link that looks configured for TLS.
    """

    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = Field(None, validate_default=True)
    check_hostname: bool = True
    server_name: str | None = Field(None, min_length=1, max_length=253)

    @field_validator("ca_file", "cert_file", "key_file", "server_name")
    @classmethod
    def _only_when_enabled(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("enabled", False):
            raise ValueError("is set while TLS is off (enabled = false), which would send results in "
                             "plaintext; set enabled = true or remove the setting")
        return value

    @field_validator("ca_file")
    @classmethod
    def _usable_ca(cls, value: Path | None) -> Path | None:
        if value is not None:
            _readable(value)
            _load_tls(lambda ctx: ctx.load_verify_locations(cafile=value), f"{value} holds no PEM certificate")
        return value

    @field_validator("cert_file")
    @classmethod
    def _usable_cert(cls, value: Path | None) -> Path | None:
        if value is not None:
            _readable(value)
        return value

    @field_validator("key_file")
    @classmethod
    def _usable_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        """Both or neither; a key that loads with cert_file (so a mismatch is found here, not at a send)."""
        cert = info.data.get("cert_file")
        if value is None:
            if cert is not None:
                raise ValueError("is required with cert_file (the client certificate's private key)")
            return value
        if "cert_file" not in info.data:  # cert_file itself failed: its own error is reported
            return value
        if cert is None:
            raise ValueError("is set without cert_file; mutual TLS needs both")
        _readable(value)
        _load_tls(lambda ctx: ctx.load_cert_chain(cert, value, password=_no_password),
                  f"{value} is not an unencrypted PEM private key that matches cert_file")
        return value

    @field_validator("check_hostname")
    @classmethod
    def _name_check_off_needs_own_ca(cls, value: bool, info: ValidationInfo) -> bool:
        """Without the name check, only the CA decides: with the system trust store that would accept any
        publicly trusted certificate, for any name, as the PACS or the engine."""
        if not value and info.data.get("enabled") and info.data.get("ca_file") is None and "ca_file" in info.data:
            raise ValueError("false needs ca_file (the private CA that signs the peer's certificate): with the "
                             "system trust store any public certificate for any name would be accepted")
        return value

    @field_validator("server_name")
    @classmethod
    def _host_name(cls, value: str | None) -> str | None:
        if value is not None and (any(c.isspace() for c in value) or not value.isascii() or "/" in value):
            raise ValueError(f"not a host name: {value!r}")
        return value

    def context(self) -> ssl.SSLContext:
        """A fresh client context (files are read now: a renewed certificate is used at the next link)."""
        return self.configure(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))

    def configure(self, context: ssl.SSLContext) -> ssl.SSLContext:
        """Set up a new ``PROTOCOL_TLS_CLIENT`` context (or a subclass's) from these settings."""
        context.verify_mode = ssl.CERT_REQUIRED
        context.minimum_version = MIN_VERSION
        context.check_hostname = self.check_hostname
        try:
            if self.ca_file is not None:
                context.load_verify_locations(cafile=str(self.ca_file))
            else:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            if self.cert_file is not None and self.key_file is not None:
                context.load_cert_chain(str(self.cert_file), str(self.key_file), password=_no_password)
        except OSError as exc:  # checked at start, but moved, replaced or unreadable since: retried
            reason = exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror
            raise Transient(f"TLS: the client TLS files cannot be loaded ({reason or type(exc).__name__})",
                            code="tls_files") from None
        return context

    def server_hostname(self, host: str) -> str:
        """The name verified and sent as SNI (none is sent for an IP address, which is matched as one)."""
        return self.server_name or host


def tls_failure(exc: BaseException, *, timeout: float | None = None, handshake: bool = True) -> str:
    """Operator text for a failed TLS handshake (``handshake``) or a TLS session the peer ended before
    answering anything, for an outbox attempt's detail. It names the problem only: OpenSSL's reason and
    verify message, never data sent or received.

    After a TLS 1.3 handshake the client learns that its certificate was refused or missing only from
    the peer's alert, or, when the peer's reset overtook the alert, from a closed connection."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed ({exc.verify_message or exc.reason or 'unknown reason'})"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)):
        if not handshake:
            return SESSION_CLOSED
        return "TLS: the peer closed the connection during the handshake (does it speak TLS on this port?)"
    if isinstance(exc, TimeoutError):
        waited = f" within {timeout:g} s" if timeout else ""
        return f"TLS: no handshake answer{waited} (does the peer speak TLS on this port?)"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc.strerror or type(exc).__name__).lower().replace("_", " ")
        if not handshake:
            return f"TLS: the peer ended the session ({reason})"
        if str(exc.reason) in NOT_TLS_REASONS:
            return f"TLS: handshake failed ({reason}): the peer does not speak TLS on this port"
        return f"TLS: handshake failed ({reason})"
    return f"TLS: handshake failed ({type(exc).__name__})"
