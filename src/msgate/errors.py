"""The two failure kinds every edge translates (STYLE.md, "Errors").

Inner code raises; only the edges (DIMSE handlers, the MLLP loop, Celery tasks, the CLI) catch and
translate. Messages never contain PHI: use internal ids or keyed hashes.

| exception   | DIMSE             | HL7 ACK | Celery             |
|-------------|-------------------|---------|--------------------|
| Rejected    | 0xA900 / 0xC000   | AR      | fail, no retry     |
| Transient   | 0xA700            | AE      | retry with backoff |
"""

from __future__ import annotations


class MsgateError(Exception):
    """Base class. ``code`` is a short machine-readable reason that is safe to log."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class Rejected(MsgateError):
    """Permanent: the input is invalid; retrying cannot help."""

    code = "rejected"


class Transient(MsgateError):
    """Temporary: out of resources, a peer or the database is down; retry later."""

    code = "transient"


class DatabaseUnavailable(Transient):
    """The database cannot be reached (refused, timed out, authentication); the message names its URL
    with the password masked, and the driver's connection message (no SQL, so no PHI)."""

    code = "db_unavailable"


class ConfigError(MsgateError):
    """Settings or key files are invalid; the message names the setting."""

    code = "config"


class HomeInUse(ConfigError):
    """Another msgate process holds this home's journal: two listeners or feeds on one home lose data."""

    code = "home_in_use"


class CryptoError(MsgateError):
    """Base of every decryption or key failure. Never returns garbage."""

    code = "crypto"


class KeyNotFound(CryptoError):
    """The key id a blob or field was wrapped with is not in the key ring."""

    code = "key_not_found"


class WrongKey(CryptoError):
    """A key with the right id failed to unwrap the data key: the key ring holds other material."""

    code = "wrong_key"


class TamperedData(CryptoError):
    """A ciphertext failed authentication: a flipped byte, a swapped chunk, or a blob under another id."""

    code = "tampered"


class TruncatedData(CryptoError):
    """A ciphertext ended before its final chunk."""

    code = "truncated"


class KeyFilePermissions(ConfigError):
    """A key file is readable or writable by group or others."""

    code = "key_permissions"


class AuditChainBroken(MsgateError):
    """The audit hash chain does not verify; the message names the first bad record."""

    code = "audit_broken"
