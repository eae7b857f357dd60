"""The ingest commit journal (used by the HL7 feed and the DICOM listener): an append-only, encrypted,
fsynced log that makes a message or instance durable before its ACK.

Why: a message must be durable before ``AA``/``CA``. Writing it straight into the index costs a blob
file, two directory/file fsyncs and a SQL transaction per message, which caps a single connection well
below the python-hl7 baseline. The journal costs one ``fdatasync`` per group of messages. An indexer
then moves journaled messages into the store through ``Ingest.store_hl7_batch`` (deduplicated, audited)
and the segment is deleted once every record in it is indexed. On start, segments left by a crash are
indexed before the listener opens, so an acknowledged message is never lost and never stored twice.

Segment file: ``MGJ1`` | u16 len + key id | u16 len + wrapped data key, then records
``u32 len | 12-byte nonce | AES-256-GCM(raw, aad=segment name|seq)``, then (in a zero-filled segment)
zeros. A torn last record (crash while writing, never acknowledged) is ignored. The data key is
wrapped by the key ring's KEK, like blobs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import uuid
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from msgate.errors import HomeInUse, TamperedData
from msgate.storage import crypto
from msgate.storage.blobs import fsync_dir
from msgate.storage.keyring import KeyRing

MAGIC = b"MGJ1"
KIND = "hl7-journal"
ROTATE_BYTES = 8 * 1024 * 1024
ZERO_FLUSH_MIB = 4  # a spare segment is zero-filled and flushed in steps of this size


def _aad(name: str, seq: int) -> bytes:
    return name.encode() + b"|" + str(seq).encode()


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a short write is not an error to the kernel)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write to a journal segment")
        view = view[n:]


class Segment:
    def __init__(self, directory: Path, ring: KeyRing, *, zero_fill: int = 0) -> None:
        """A new segment file, made durable with its folder entry. With ``zero_fill`` its first bytes are
        written as zeros first: appends then overwrite allocated blocks, and ``fdatasync`` has no file
        size or extent change to journal (about half the latency on ext4)."""
        self.name = f"{uuid.uuid4().hex}.jnl"
        self.path = directory / self.name
        self.dek, wrapped = crypto.new_data_key(ring, blob_id=self.name, kind=KIND)
        kid = wrapped.kek_id.encode()
        header = MAGIC + struct.pack(">H", len(kid)) + kid + struct.pack(">H", len(wrapped.wrapped)) + wrapped.wrapped
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(self.fd, header)
            zeros = bytes(1 << 20)
            for offset in range(len(header), zero_fill, len(zeros)):
                _write_all(self.fd, zeros[:zero_fill - offset])
                if (offset // len(zeros)) % ZERO_FLUSH_MIB == ZERO_FLUSH_MIB - 1:
                    os.fdatasync(self.fd)  # a few MiB per flush: appends to the current segment wait less
            os.lseek(self.fd, len(header), os.SEEK_SET)
            os.fsync(self.fd)
            fsync_dir(directory)
        except OSError:  # ENOSPC, EIO: no half-made segment is left for recovery to trip over
            os.close(self.fd)
            self.path.unlink(missing_ok=True)
            raise
        self.aead = AESGCM(self.dek)
        self.size, self.seq, self.indexed, self.closed = len(header), 0, 0, False


class Journal:
    """Thread-safe appends (one fsync per call) and per-segment bookkeeping of what was indexed."""

    def __init__(self, directory: Path, ring: KeyRing, *, rotate_bytes: int = ROTATE_BYTES,
                 preallocate: bool = False) -> None:
        """With ``preallocate`` the next segment is made ahead, zero-filled, by a background thread."""
        self.directory, self.ring, self.rotate_bytes = directory, ring, rotate_bytes
        self.preallocate = preallocate
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._owner = _own(directory)
        self._lock = threading.Lock()
        self._current: Segment | None = None
        self._segments: dict[str, Segment] = {}
        self._spare: Segment | None = None
        self._preparing: threading.Thread | None = None

    def leftovers(self) -> list[Path]:
        """Segments on disk before this process started appending (a crash or an unclean stop)."""
        return sorted((p for p in self.directory.glob("*.jnl") if p.name not in self._segments),
                      key=lambda p: p.stat().st_mtime)

    def start(self) -> None:
        """Make the first segment now and, with ``preallocate``, its zero-filled spare: the first
        appends (acknowledgements waiting on them) then find both ready."""
        self.append([])
        preparing = self._preparing
        if preparing is not None:
            preparing.join()

    def append(self, raws: list[bytes]) -> str:
        """Write and fsync ``raws``; return the segment name to pass to :meth:`indexed` later."""
        with self._lock:
            seg = self._current
            if seg is None or seg.size > self.rotate_bytes:
                seg = self._rotate()
            first = seg.seq
            try:
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
            except OSError:
                # Nothing of this call is acknowledged, but part of it may be on disk: appending behind
                # it would misplace every later record (their sequence numbers and offsets). The
                # segment takes no more appends (its acknowledged records stay until indexed) and the
                # next call starts a new one.
                seg.seq = first
                self._current = None
                try:
                    self._close(seg)
                except OSError:
                    pass
                raise
            seg.size += len(out)
            return seg.name

    def _rotate(self) -> Segment:
        if self._current is not None:
            self._close(self._current)
        seg, self._spare = self._spare, None
        if seg is None:
            seg = Segment(self.directory, self.ring, zero_fill=self.rotate_bytes if self.preallocate else 0)
            self._segments[seg.name] = seg
        self._current = seg
        if self.preallocate and (self._preparing is None or not self._preparing.is_alive()):
            self._preparing = threading.Thread(target=self._prepare_spare, name="journal-prealloc", daemon=True)
            self._preparing.start()
        return seg

    def _prepare_spare(self) -> None:
        try:
            seg = Segment(self.directory, self.ring, zero_fill=self.rotate_bytes)
        except OSError:  # the next rotation makes its segment itself
            return
        with self._lock:
            self._spare = self._segments[seg.name] = seg

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
            if seg is self._current and seg.indexed >= seg.seq and seg.size > self.rotate_bytes // 8:
                self._current = None
                self._close(seg)
            else:
                self._maybe_delete(seg)

    def close(self) -> None:
        if self._preparing is not None:
            self._preparing.join()
        with self._lock:
            for seg in (self._current, self._spare):
                if seg is not None:
                    self._close(seg)
            self._current = self._spare = None
        if self._owner is not None:
            os.close(self._owner)  # releases the folder's lock
            self._owner = None


def _own(directory: Path) -> int:
    """Hold the folder's lock (``flock`` on ``<folder>.lock`` beside it) while this journal is open; released by the kernel
    when the process ends, however it ends.

    A second listener or feed started on the same home (a systemd unit plus a manual run, two feeds on
    two ports) took the running one's live segments for a crash's leftovers: it indexed and deleted them
    while the first kept appending to the deleted files and acknowledging, so what it acknowledged next
    was lost at its next restart. The second one now stops before it reads anything."""
    fd = os.open(directory.parent / f"{directory.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HomeInUse(f"{directory} is in use by another msgate process: each DICOM listener and HL7 feed "
                        "needs its own MSGATE_HOME (or stop the other one first)") from None
    return fd


def segment_key_id(path: Path) -> str | None:
    """The id of the KEK that wraps a segment's data key (None: not a journal segment, or torn header)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4 + 2 + 256)
    except OSError:
        return None
    if head[:4] != MAGIC or len(head) < 6:
        return None
    (klen,) = struct.unpack_from(">H", head, 4)
    kid = head[6:6 + klen]
    return kid.decode(errors="replace") if len(kid) == klen else None


JOURNAL_DIRS = ("dicom-journal", "hl7-journal")


def key_usage(home: Path) -> dict[str, int]:
    """How many journal segments (DICOM and HL7 commit journals under ``home``, and the quarantine in
    their subfolders) each KEK wraps."""
    usage: dict[str, int] = {}
    for name in JOURNAL_DIRS:
        for path in (home / name).rglob("*.jnl"):
            kid = segment_key_id(path)
            if kid is not None:
                usage[kid] = usage.get(kid, 0) + 1
    return usage


def read_segment(path: Path, ring: KeyRing) -> list[bytes]:
    """The records of a segment left on disk; a torn tail is dropped, a forged record raises."""
    data = path.read_bytes()
    if data[:4] != MAGIC:
        return []
    pos = 4
    try:
        (klen,) = struct.unpack_from(">H", data, pos)
        kid = data[pos + 2:pos + 2 + klen].decode()
        pos += 2 + klen
        (wlen,) = struct.unpack_from(">H", data, pos)
        wrapped = data[pos + 2:pos + 2 + wlen]
        pos += 2 + wlen
    except (struct.error, UnicodeDecodeError):
        return []  # header cut short (a crash while the segment was made): no record was ever appended
    if pos > len(data):
        return []
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
            following = data[pos + 4 + length:pos + 8 + length]
            if len(following) == 4 and not any(following):
                break  # torn last record in a zero-filled segment: nothing was written after it
            raise TamperedData(f"journal segment {path.name} record {seq} failed authentication") from None
        pos += 4 + length
    return out
