"""Envelope encryption: a fresh AES-256-GCM data key per blob, wrapped by a KEK from the key ring.

Blob stream format (version 1)::

    header  = b"MSGB" | version (1 B) | chunk_size (u32 BE) | nonce_prefix (8 B)
    chunk_i = AES-GCM(dek, nonce = nonce_prefix | i (u32 BE),
                      aad = b"msgate-blob-v1" | blob_id | 0 | kind | 0 | header | i | final_flag)

Every chunk is authenticated with its index and a final flag, and the associated data binds it to the
blob's id and kind, so a flipped byte, reordered or dropped chunks, a truncated file or a blob moved to
another id each fail with a specific error. Memory stays bounded by the chunk size.

Wrapped data keys live in the index (``blob.wrapped_dek``), not in the blob body, so key rotation
re-wraps keys without touching bodies.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from msgate.errors import CryptoError, KeyNotFound, TamperedData, TruncatedData, WrongKey
from msgate.storage import keyring
from msgate.storage.keyring import Kek, KeyRing

MAGIC = b"MSGB"
VERSION = 1
HEADER = struct.Struct(">4sBI8s")
TAG = 16
DEFAULT_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class WrappedKey:
    kek_id: str
    wrapped: bytes


def _dek_aad(blob_id: str, kind: str, kek_id: str) -> bytes:
    return b"msgate-dek-v1|" + blob_id.encode() + b"|" + kind.encode() + b"|" + kek_id.encode()


def wrap_key(kek: Kek, dek: bytes, *, blob_id: str, kind: str) -> WrappedKey:
    nonce = os.urandom(12)
    return WrappedKey(kek.id, nonce + AESGCM(kek.key).encrypt(nonce, dek, _dek_aad(blob_id, kind, kek.id)))


def unwrap_key(ring: KeyRing, wrapped: WrappedKey, *, blob_id: str, kind: str) -> bytes:
    if not wrapped.wrapped:
        raise TruncatedData(f"blob {blob_id} has no data key: erased when it was purged")
    kek = kek_of(ring, wrapped.kek_id)
    try:
        return AESGCM(kek.key).decrypt(
            wrapped.wrapped[:12], wrapped.wrapped[12:], _dek_aad(blob_id, kind, wrapped.kek_id)
        )
    except InvalidTag:
        raise WrongKey(
            f"data key of blob {blob_id} does not unwrap with key {wrapped.kek_id}: wrong key material, "
            "or the key record belongs to another blob"
        ) from None


def kek_of(ring: KeyRing, kek_id: str) -> Kek:
    """KEK ``kek_id`` from ``ring``, or from the key ring file as it is now when ``ring`` (loaded at the
    process's start) lacks it: a ``keys rotate`` since then re-wrapped the data keys under a new KEK.
    KeyNotFound only when the file lacks it too."""
    if not ring.has(kek_id):
        ring = keyring.newer(ring) or ring
    return ring.get(kek_id)


def new_data_key(ring: KeyRing, *, blob_id: str, kind: str) -> tuple[bytes, WrappedKey]:
    dek = AESGCM.generate_key(bit_length=256)
    return dek, wrap_key(ring.active, dek, blob_id=blob_id, kind=kind)


def _chunk_aad(prefix: bytes, index: int, final: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if final else 0)


def _aad_prefix(blob_id: str, kind: str, header: bytes) -> bytes:
    return b"msgate-blob-v1" + blob_id.encode() + b"\0" + kind.encode() + b"\0" + header


_buffers = threading.local()


def _out_buffer(size: int) -> bytearray:
    """A per-thread output buffer, reused across blobs: no fresh (page-faulting) allocation per chunk."""
    buf: bytearray | None = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < size:
        buf = _buffers.buf = bytearray(size)
    return buf


def encrypt_stream(
    dek: bytes, reader: Callable[[int], bytes], *, blob_id: str, kind: str, chunk_size: int = DEFAULT_CHUNK
) -> Iterator[bytes]:
    """Yield the header, then one ciphertext chunk per ``chunk_size`` bytes read (bounded memory).

    Each yielded chunk is a view of a per-thread buffer that the next chunk overwrites: consume it
    (write it out, or copy it) before asking for the next one.
    """
    nonce_prefix = os.urandom(8)
    header = HEADER.pack(MAGIC, VERSION, chunk_size, nonce_prefix)
    yield header
    aead = AESGCM(dek)
    prefix = _aad_prefix(blob_id, kind, header)
    current = reader(chunk_size)
    index = 0
    while True:
        following = reader(chunk_size) if len(current) == chunk_size else b""
        final = not following
        nonce = nonce_prefix + struct.pack(">I", index)
        out = memoryview(_out_buffer(chunk_size + TAG))[: len(current) + TAG]
        aead.encrypt_into(nonce, current, _chunk_aad(prefix, index, final), out)
        yield out  # type: ignore[misc]
        if final:
            return
        current, index = following, index + 1


def encrypt_bytes(dek: bytes, data: bytes, *, blob_id: str, kind: str, chunk_size: int = DEFAULT_CHUNK) -> bytes:
    return b"".join(bytes(piece) for piece in
                    encrypt_stream(dek, io.BytesIO(data).read, blob_id=blob_id, kind=kind, chunk_size=chunk_size))


def decrypt_stream(dek: bytes, reader: Callable[[int], bytes], *, blob_id: str, kind: str) -> Iterator[bytes]:
    """Yield plaintext chunks; raise TamperedData or TruncatedData rather than return garbage."""
    header = reader(HEADER.size)
    if len(header) < HEADER.size:
        raise TruncatedData(f"blob {blob_id} is shorter than its header")
    magic, version, chunk_size, nonce_prefix = HEADER.unpack(header)
    if magic != MAGIC or version != VERSION:
        raise TamperedData(f"blob {blob_id} has no msgate header (magic or version mismatch)")
    aead = AESGCM(dek)
    prefix = _aad_prefix(blob_id, kind, header)
    current = reader(chunk_size + TAG)
    index = 0
    while True:
        if len(current) < TAG:
            raise TruncatedData(f"blob {blob_id} ends inside chunk {index}")
        following = reader(chunk_size + TAG) if len(current) == chunk_size + TAG else b""
        final = not following
        nonce = nonce_prefix + struct.pack(">I", index)
        try:
            yield aead.decrypt(nonce, current, _chunk_aad(prefix, index, final))
        except InvalidTag:
            raise _classify_failure(aead, nonce, current, prefix, index, final, blob_id) from None
        if final:
            return
        current, index = following, index + 1


def _classify_failure(
    aead: AESGCM, nonce: bytes, chunk: bytes, prefix: bytes, index: int, final: bool, blob_id: str
) -> CryptoError:
    if final:
        try:
            aead.decrypt(nonce, chunk, _chunk_aad(prefix, index, False))
        except InvalidTag:
            pass
        else:
            return TruncatedData(f"blob {blob_id} was truncated after chunk {index}")
    return TamperedData(f"blob {blob_id} failed authentication at chunk {index} (altered, reordered or wrong id)")


def decrypt_bytes(dek: bytes, data: bytes, *, blob_id: str, kind: str) -> bytes:
    return b"".join(decrypt_stream(dek, io.BytesIO(data).read, blob_id=blob_id, kind=kind))


# --- PHI columns -----------------------------------------------------------------------------------

FIELD_MAGIC = b"F1"


class FieldCipher:
    """Encrypts PHI columns and computes blind indexes.

    Values are encrypted with AES-256-GCM under a *field data key* (``data_key`` table), which is
    wrapped by a KEK like any blob key, so rotation re-wraps one key instead of rewriting rows. The
    associated data is the column name, so a value copied into another column does not decrypt.
    Token: ``b"F1" | len(key_id) | key_id | nonce | ciphertext``.
    """

    def __init__(self, ring: KeyRing, keys: dict[str, bytes], active: str) -> None:
        self.ring = ring
        self.active = active
        self._keys = {key_id: AESGCM(key) for key_id, key in keys.items()}

    def encrypt(self, value: str | None, *, column: str) -> bytes | None:
        if value is None:
            return None
        key_id = self.active.encode()
        nonce = os.urandom(12)
        ct = self._keys[self.active].encrypt(nonce, value.encode("utf-8"), column.encode())
        return FIELD_MAGIC + bytes([len(key_id)]) + key_id + nonce + ct

    @staticmethod
    def key_id_of(token: bytes) -> str:
        return token[3 : 3 + token[2]].decode()

    def decrypt(self, token: bytes | None, *, column: str) -> str | None:
        if token is None:
            return None
        token = bytes(token)
        if token[:2] != FIELD_MAGIC:
            raise TamperedData(f"column {column} holds a value that is not a msgate field ciphertext")
        key_id = self.key_id_of(token)
        if key_id not in self._keys:
            raise KeyNotFound(f"field key {key_id!r} is not available; the database and key ring do not match")
        body = token[3 + token[2] :]
        try:
            return self._keys[key_id].decrypt(body[:12], body[12:], column.encode()).decode("utf-8")
        except InvalidTag:
            raise TamperedData(f"column {column} value failed authentication (altered or moved)") from None

    def blind_index(self, value: str, *, scope: str) -> str:
        """Keyed HMAC-SHA256 for equality lookups; ``scope`` separates e.g. MRN from accession."""
        return hmac.new(self.ring.index_key, scope.encode() + b"|" + value.strip().encode("utf-8"),
                        hashlib.sha256).hexdigest()

    def uid_hash(self, uid: str) -> str:
        """A short keyed hash of a UID, for logs and correlation."""
        return self.blind_index(uid, scope="log")[:16]
