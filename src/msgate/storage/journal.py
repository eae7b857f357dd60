"""The ingest commit journal (used by the HL7 feed): an append-only, encrypted, fsynced log
that makes a message durable before its ACK.

Why: a message must be durable before ``AA``/``CA``. Writing it straight into the index costs a blob
file, two directory/file fsyncs and a SQL transaction per message, which caps a single connection well
below the python-hl7 baseline. The journal costs one ``fdatasync`` per group of messages. An indexer
then moves journaled messages into the store through ``Ingest.store_hl7_batch`` (deduplicated, audited)
and the segment is deleted once every record in it is indexed. On start, segments left by a crash are
indexed before the listener opens, so an acknowledged message is never lost and never stored twice.

Segment file: ``MGJ1`` | u16 len + key id | u16 len + wrapped data key, then records
``u32 len | 12-byte nonce | AES-256-GCM(raw, aad=segment name|seq)``. A torn last record (crash while
writing, never acknowledged) is ignored. The data key is wrapped by the key ring's KEK, like blobs.
"""

from __future__ import annotations

import os
import struct
import threading
import uuid
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from msgate.errors import TamperedData
from msgate.storage import crypto
from msgate.storage.keyring import KeyRing

MAGIC = b"MGJ1"
KIND = "hl7-journal"
ROTATE_BYTES = 8 * 1024 * 1024


def _aad(name: str, seq: int) -> bytes:
    return name.encode() + b"|" + str(seq).encode()


class Segment:
    def __init__(self, directory: Path, ring: KeyRing) -> None:
        self.name = f"{uuid.uuid4().hex}.jnl"
        self.path = directory / self.name
        self.dek, wrapped = crypto.new_data_key(ring, blob_id=self.name, kind=KIND)
        kid = wrapped.kek_id.encode()
        header = MAGIC + struct.pack(">H", len(kid)) + kid + struct.pack(">H", len(wrapped.wrapped)) + wrapped.wrapped
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(self.fd, header)
        self.aead = AESGCM(self.dek)
        self.size, self.seq, self.indexed, self.closed = len(header), 0, 0, False


class Journal:
    """Thread-safe appends (one fsync per call) and per-segment bookkeeping of what was indexed."""

    def __init__(self, directory: Path, ring: KeyRing) -> None:
        self.directory, self.ring = directory, ring
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._current: Segment | None = None
        self._segments: dict[str, Segment] = {}

    def leftovers(self) -> list[Path]:
        """Segments on disk before this process started appending (a crash or an unclean stop)."""
        return sorted((p for p in self.directory.glob("*.jnl") if p.name not in self._segments),
                      key=lambda p: p.stat().st_mtime)

    def append(self, raws: list[bytes]) -> str:
        """Write and fsync ``raws``; return the segment name to pass to :meth:`indexed` later."""
        with self._lock:
            seg = self._current
            if seg is None or seg.size > ROTATE_BYTES:
                seg = self._rotate()
            out = bytearray()
            for raw in raws:
                seg.seq += 1
                nonce = os.urandom(12)
                body = nonce + seg.aead.encrypt(nonce, raw, _aad(seg.name, seg.seq))
                out += struct.pack(">I", len(body)) + body
            view = memoryview(out)
            while view:
                view = view[os.write(seg.fd, view):]
            os.fdatasync(seg.fd)
            seg.size += len(out)
            return seg.name

    def _rotate(self) -> Segment:
        if self._current is not None:
            self._close(self._current)
        seg = Segment(self.directory, self.ring)
        os.fsync(seg.fd)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._current = self._segments[seg.name] = seg
        return seg

    def _close(self, seg: Segment) -> None:
        seg.closed = True
        os.close(seg.fd)
        self._maybe_delete(seg)

    def _maybe_delete(self, seg: Segment) -> None:
        if seg.closed and seg.indexed >= seg.seq:
            seg.path.unlink(missing_ok=True)
            self._segments.pop(seg.name, None)

    def indexed(self, name: str, count: int) -> None:
        """``count`` records of segment ``name`` are in the store; an idle, fully indexed journal is rotated."""
        with self._lock:
            seg = self._segments.get(name)
            if seg is None:
                return
            seg.indexed += count
            if seg is self._current and seg.indexed >= seg.seq and seg.size > ROTATE_BYTES // 8:
                self._current = None
                self._close(seg)
            else:
                self._maybe_delete(seg)

    def close(self) -> None:
        with self._lock:
            if self._current is not None:
                self._close(self._current)
                self._current = None


def read_segment(path: Path, ring: KeyRing) -> list[bytes]:
    """The records of a segment left on disk; a torn tail is dropped, a forged record raises."""
    data = path.read_bytes()
    if data[:4] != MAGIC:
        return []
    pos = 4
    (klen,) = struct.unpack_from(">H", data, pos)
    kid = data[pos + 2:pos + 2 + klen].decode()
    pos += 2 + klen
    (wlen,) = struct.unpack_from(">H", data, pos)
    wrapped = data[pos + 2:pos + 2 + wlen]
    pos += 2 + wlen
    aead = AESGCM(crypto.unwrap_key(ring, crypto.WrappedKey(kid, wrapped), blob_id=path.name, kind=KIND))
    out, seq = [], 0
    while pos + 4 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        body = data[pos + 4:pos + 4 + length]
        if len(body) < length or length < 28:
            break  # torn tail: written but never acknowledged
        seq += 1
        try:
            out.append(aead.decrypt(body[:12], body[12:], _aad(path.name, seq)))
        except InvalidTag:
            raise TamperedData(f"journal segment {path.name} record {seq} failed authentication") from None
        pos += 4 + length
    return out
