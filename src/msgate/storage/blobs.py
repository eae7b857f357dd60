"""Encrypted blobs behind one interface, with two body backends.

- ``LocalBodies`` (embedded default): one file per blob under ``MSGATE_HOME/blobs``, written atomically
  (temp file, fsync, rename, fsync of the folder). Paths use random blob ids, never UIDs.
- ``PostgresBodies``: ciphertext chunks as rows of ``blob_chunk``, streamed in and out one row at a
  time, inside the caller's transaction; workers on several machines then share one store.

:class:`Blobs` does the envelope encryption and keeps the ``blob`` index row (wrapped data key).
Memory stays bounded by the chunk size in both directions. A purge erases the wrapped data key with the
body (crypto-shredding), so a copy of the body in a backup of the blob folder cannot be decrypted.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol

from sqlalchemy import delete, func, insert, select, update
from sqlmodel import Session, col

from msgate.errors import TamperedData, TruncatedData
from msgate.storage import crypto, keyring
from msgate.storage.db import Database
from msgate.storage.keyring import KeyRing
from msgate.storage.models import Blob, BlobChunk, new_id, utcnow

log = logging.getLogger(__name__)

Source = bytes | bytearray | memoryview | Path | BinaryIO


class Bodies(Protocol):
    name: str

    def write(self, session: Session, blob_id: str, pieces: Iterable[bytes], *, durable: bool = True) -> int: ...
    def reader(self, session: Session, blob_id: str) -> Callable[[int], bytes]: ...
    def delete(self, session: Session, blob_id: str) -> None: ...
    def exists(self, session: Session, blob_id: str) -> bool: ...
    def sync(self) -> None: ...


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a new or renamed file in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBodies:
    """Blob bodies as files; a write is durable when it returns."""

    name = "local"

    def __init__(self, root: Path) -> None:
        """256 bucket folders are made (and made durable) once, so a write never creates a folder."""
        self.root, self._root = root, str(root)
        self._known: set[str] = set()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not (root / "ff").is_dir():
            for bucket in range(256):
                (root / f"{bucket:02x}").mkdir(exist_ok=True, mode=0o700)
            fsync_dir(root)

    def path(self, blob_id: str) -> Path:
        return self.root / blob_id[:2] / blob_id

    def _ensure_dir(self, folder: str) -> None:
        if folder in self._known:
            return
        if not os.path.isdir(folder):
            os.makedirs(folder, mode=0o700, exist_ok=True)
            fsync_dir(Path(folder).parent)
        self._known.add(folder)

    def write(self, session: Session, blob_id: str, pieces: Iterable[bytes], *, durable: bool = True) -> int:
        """Write atomically (temp file, rename); durable on return unless ``durable`` is False, in which
        case :meth:`sync` makes it (and every other such write) durable later, in one call."""
        folder = os.path.join(self._root, blob_id[:2])
        self._ensure_dir(folder)
        target, tmp = os.path.join(folder, blob_id), os.path.join(folder, f".{blob_id}.tmp")
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            pending: list[bytes] = []
            chunks = 0
            for piece in pieces:  # the small header goes out with the first chunk: one syscall
                pending.append(piece)
                size += len(piece)
                if not (isinstance(piece, bytes) and len(piece) <= 4096):  # never hold a reused buffer
                    if durable and chunks:  # a multi-chunk blob: the disk writes while the next chunk encrypts
                        _start_writeback(fd)
                    _write_all(fd, pending)
                    pending = []
                    chunks += 1
            _write_all(fd, pending)
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, target)
        if durable:
            fsync_dir(Path(folder))
        return size

    def sync(self) -> None:
        """Make every write so far durable: ``syncfs`` of the blob file system (one flush for a whole batch
        of files and their folder entries), or ``sync`` where syncfs is not available."""
        fd = os.open(self.root, os.O_RDONLY)
        try:
            if _LIBC is None or _LIBC.syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)

    def reader(self, session: Session, blob_id: str) -> Callable[[int], bytes]:
        path = self.path(blob_id)
        if not path.exists():
            raise TruncatedData(f"blob {blob_id} has no body on disk (deleted or never written)")
        handle = path.open("rb")
        return _closing_reader(handle)

    def delete(self, session: Session, blob_id: str) -> None:
        self.path(blob_id).unlink(missing_ok=True)

    def exists(self, session: Session, blob_id: str) -> bool:
        return self.path(blob_id).exists()


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc if hasattr(libc, "syncfs") else None
    except OSError:
        return None


_LIBC = _libc()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int) -> None:
    """Start (not wait for) write-back of the file's dirty pages, so the final fsync has little left to do.
    A hint only: where ``sync_file_range`` is missing, the fsync does all the work as before."""
    if _LIBC is not None and hasattr(_LIBC, "sync_file_range"):
        _LIBC.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))


def _write_all(fd: int, pieces: list[bytes]) -> None:
    views = [memoryview(p) for p in pieces if p]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _closing_reader(handle: BinaryIO) -> Callable[[int], bytes]:
    def read(n: int) -> bytes:
        data = handle.read(n)
        if len(data) < n:
            handle.close()
        return data

    return read


class _PieceReader:
    """Turns an iterator of byte pieces into a read(n) callable without holding more than needed."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces = pieces
        self.buffer = bytearray()

    def __call__(self, n: int) -> bytes:
        while len(self.buffer) < n:
            piece = next(self.pieces, None)
            if piece is None:
                break
            self.buffer += piece
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out


class PostgresBodies:
    """Blob bodies as ``blob_chunk`` rows (seq 0 is the header, then one row per ciphertext chunk)."""

    name = "postgres"

    def write(self, session: Session, blob_id: str, pieces: Iterable[bytes], *, durable: bool = True) -> int:
        """Rows in the caller's transaction: durable when it commits, whatever ``durable`` says."""
        size = 0
        for seq, piece in enumerate(pieces):
            session.execute(insert(BlobChunk), {"blob_id": blob_id, "seq": seq, "data": piece})
            size += len(piece)
        return size

    def sync(self) -> None:
        """Nothing to do: rows are durable with their transaction."""

    def reader(self, session: Session, blob_id: str) -> Callable[[int], bytes]:
        rows = session.execute(
            select(BlobChunk.data).where(BlobChunk.blob_id == blob_id).order_by(BlobChunk.seq)  # type: ignore[arg-type]
            .execution_options(stream_results=True, yield_per=1)
        ).scalars()
        return _PieceReader(iter(rows))

    def delete(self, session: Session, blob_id: str) -> None:
        session.execute(delete(BlobChunk).where(BlobChunk.blob_id == blob_id))  # type: ignore[arg-type]

    def exists(self, session: Session, blob_id: str) -> bool:
        found = session.execute(
            select(BlobChunk.seq).where(BlobChunk.blob_id == blob_id).limit(1)  # type: ignore[arg-type]
        ).first()
        return found is not None


def _memory_reader(source: bytes | bytearray | memoryview) -> Callable[[int], bytes]:
    """read(n) over bytes already in memory, as zero-copy slices."""
    view, position = memoryview(source), 0

    def read(n: int) -> bytes:
        nonlocal position
        piece = view[position : position + n]
        position += len(piece)
        return piece  # type: ignore[return-value]  # a memoryview; AES-GCM takes any bytes-like

    return read


def _source_reader(source: Source) -> tuple[Callable[[int], bytes], Callable[[], None]]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _memory_reader(source), lambda: None
    if isinstance(source, Path):
        stream = source.open("rb")
    else:
        return source.read, lambda: None
    return stream.read, stream.close


@dataclass(frozen=True)
class BlobRecord:
    """The values of a ``blob`` index row."""

    id: str
    kind: str
    backend: str
    kek_id: str
    wrapped_dek: bytes
    size: int
    stored_size: int
    created_at: datetime


class Blobs:
    """The encrypted blob store: ``put`` in the caller's transaction, ``open``/``read`` to decrypt."""

    def __init__(self, *, db: Database, ring: KeyRing, bodies: Bodies, chunk_bytes: int = crypto.DEFAULT_CHUNK):
        self.db = db
        self.ring = ring
        self.bodies = bodies
        self.chunk_bytes = chunk_bytes
        self.on_new_ring: Callable[[KeyRing], None] | None = None  # the store swaps its other holders

    def refresh_ring(self) -> bool:
        """Swap in the key ring file as it is now if it changed since it was loaded (``keys rotate`` while
        this process runs); from then on new data keys are wrapped under its active KEK too."""
        fresh = keyring.newer(self.ring)
        if fresh is None:
            return False
        self.ring = fresh
        if self.on_new_ring is not None:
            self.on_new_ring(fresh)
        return True

    def write_body(self, session: Session, *, kind: str, source: Source, durable: bool = True) -> Blob:
        """Encrypt and write the body (durable on return, or after ``bodies.sync()`` when ``durable`` is
        False); return the index row, not yet added."""
        return Blob(**asdict(self.write_record(session, kind=kind, source=source, durable=durable)))

    def write_record(self, session: Session, *, kind: str, source: Source, durable: bool = True) -> BlobRecord:
        """:meth:`write_body` for callers that insert the index row themselves (no ORM object)."""
        blob_id = new_id()
        dek, wrapped = crypto.new_data_key(self.ring, blob_id=blob_id, kind=kind)
        counted = _Counting(*_source_reader(source))
        try:
            pieces = crypto.encrypt_stream(dek, counted.read, blob_id=blob_id, kind=kind, chunk_size=self.chunk_bytes)
            stored = self.bodies.write(session, blob_id, pieces, durable=durable)
        finally:
            counted.close()
        return BlobRecord(id=blob_id, kind=kind, backend=self.bodies.name, kek_id=wrapped.kek_id,
                          wrapped_dek=wrapped.wrapped, size=counted.total, stored_size=stored, created_at=utcnow())

    def put(self, session: Session, *, kind: str, source: Source) -> Blob:
        """Write the body and add the index row to ``session``; durable once the caller commits."""
        blob = self.write_body(session, kind=kind, source=source)
        session.add(blob)
        return blob

    def discard_body(self, session: Session, blob_id: str) -> None:
        """Remove a body whose index row was never committed (lost race, rolled-back ingest).

        Outside a transaction (``session`` None) the body stays when its row exists after all: a COMMIT
        that raised (the connection dropped) may still have committed on the server, and the sender, told
        to resend, then finds the row as a duplicate of an acknowledged message whose body would be gone.
        When that cannot be checked (the database is still away) the body stays too: an unreferenced
        file costs disk, a deleted body of a committed row loses an acknowledged instance. (The ingest
        paths retry with the bodies they already wrote, so an outage does not leave one per attempt.)"""
        if session is None:
            try:
                with self.db.session() as check:
                    if check.get(Blob, blob_id) is not None:
                        log.warning("body kept: its index row was committed after all", extra={"blob_id": blob_id})
                        return
            except Exception:  # noqa: BLE001 - any failure to check keeps the body
                log.warning("body kept: whether its index row was committed cannot be checked now",
                            extra={"blob_id": blob_id})
                return
        self.bodies.delete(session, blob_id)

    def _dek(self, blob: Blob) -> bytes:
        """The blob's data key. A KEK id missing from the loaded ring re-reads the key ring file once
        (:meth:`refresh_ring`): KeyNotFound only when the file lacks it too."""
        if blob.purged_at is not None or not blob.wrapped_dek:
            raise TruncatedData(f"blob {blob.id} was purged: its data key is erased")
        if not self.ring.has(blob.kek_id):
            self.refresh_ring()
        return crypto.unwrap_key(self.ring, crypto.WrappedKey(blob.kek_id, blob.wrapped_dek),
                                 blob_id=blob.id, kind=blob.kind)

    def open(self, session: Session, blob_id: str) -> Iterator[bytes]:
        """Plaintext chunks of a blob; raises a CryptoError subclass instead of returning garbage."""
        blob = session.get(Blob, blob_id)
        if blob is None:
            raise TamperedData(f"blob {blob_id} has no index row")
        if blob.purged_at is not None:
            raise TruncatedData(f"blob {blob_id} was purged by retention at {blob.purged_at:%Y-%m-%d}")
        dek = self._dek(blob)
        return crypto.decrypt_stream(dek, self.bodies.reader(session, blob_id), blob_id=blob.id, kind=blob.kind)

    def read(self, session: Session, blob_id: str) -> bytes:
        return b"".join(self.open(session, blob_id))

    def read_to(self, session: Session, blob_id: str, target: BinaryIO) -> int:
        total = 0
        for chunk in self.open(session, blob_id):
            target.write(chunk)
            total += len(chunk)
        return total

    def rewrap(self, blob: Blob) -> bool:
        """Re-wrap the blob's data key under the active KEK (body untouched). False if already there, or
        purged: a purged blob's key is erased, never carried forward under a new KEK."""
        if blob.purged_at is not None or blob.kek_id == self.ring.active_id:
            return False
        wrapped = crypto.wrap_key(self.ring.active, self._dek(blob), blob_id=blob.id, kind=blob.kind)
        blob.kek_id, blob.wrapped_dek = wrapped.kek_id, wrapped.wrapped
        return True

    def purge(self, session: Session, blob: Blob) -> None:
        """Delete the body and erase its wrapped data key (crypto-shredding); keep the index row, marked
        purged, for the audit trail and traces. The kept key decrypted any copy of the body (a backup of
        the blob folder) with the current key ring, and every rotation re-wrapped it again."""
        self.bodies.delete(session, blob.id)
        blob.wrapped_dek = b""
        blob.purged_at = utcnow()
        session.add(blob)

    @staticmethod
    def shred_purged(session: Session) -> int:
        """Erase the data keys that purges made before crypto-shredding left in their rows."""
        result = session.execute(update(Blob).where(col(Blob.purged_at).is_not(None),  # type: ignore[arg-type]
                                                    func.length(col(Blob.wrapped_dek)) > 0).values(wrapped_dek=b""))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


class _Counting:
    def __init__(self, read: Callable[[int], bytes], close: Callable[[], None]) -> None:
        self._read, self.close, self.total = read, close, 0

    def read(self, n: int) -> bytes:
        data = self._read(n)
        self.total += len(data)
        return data


def make_bodies(backend: str, blob_dir: Path) -> Bodies:
    return PostgresBodies() if backend == "postgres" else LocalBodies(blob_dir)


def free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free
