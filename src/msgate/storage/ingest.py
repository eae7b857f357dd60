"""The single write path of both listeners: store a DICOM instance or an HL7 message durably.

Each call writes the encrypted body (fsynced), then commits the index rows and an audit event in one
transaction. Only after it returns may a listener acknowledge (C-STORE 0x0000, HL7 AA/CA).
Both are idempotent on their natural key: SOP Instance UID (identical bytes are a duplicate; changed
bytes become a new version, audited), and MSH-10 + sending application + facility.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from msgate import metrics
from msgate.errors import Rejected, Transient
from msgate.listener.dataset import header_of
from msgate.listener.dataset import parse as parse_header
from msgate.storage import audit
from msgate.storage.blobs import Blobs, free_bytes
from msgate.storage.crypto import FieldCipher
from msgate.storage.db import Database
from msgate.storage.index_dicom import BatchIndexer, HeaderLike, PreparedInstance, StoredInstance
from msgate.storage.models import Blob, Hl7Message, Instance

log = logging.getLogger(__name__)
HL7_BODY_WRITERS = 8  # parallel fsyncs of HL7 bodies (ext4 commits them together)


def body_digest(raw: bytes) -> str:
    """SHA-256 of a message's segments after MSH, line endings normalised to CR."""
    rest = re.split(rb"\r\n|\r|\n", raw.strip(b"\r\n"), maxsplit=1)
    body = re.sub(rb"\r\n|\n", b"\r", rest[1]).strip(b"\r") if len(rest) > 1 else b""
    return hashlib.sha256(body).hexdigest()


def _sender_msh10(header: Hl7Header) -> str:
    return f"{header.sending_application}|{header.sending_facility}|{header.control_id}"


@dataclass(frozen=True)
class Hl7Header:
    """What the commit path reads from MSH before storing (no full parse needed)."""

    control_id: str
    sending_application: str = ""
    sending_facility: str = ""
    message_type: str = ""
    trigger: str = ""
    structure: str = ""
    version: str = ""


@dataclass(frozen=True)
class Received:
    """One instance as the listener received it (file meta + data set) and journaled it."""

    data: bytes
    header: HeaderLike
    calling_aet: str = ""
    assoc_id: str | None = None


@dataclass(frozen=True)
class StoredMessage:
    message_id: int
    duplicate: bool


def read_header(source: bytes | Path) -> HeaderLike:
    """The identifying header; Rejected for undecodable, incomplete or truncated datasets."""
    if isinstance(source, (bytes, bytearray)):
        return parse_header(bytes(source))
    try:
        handle: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        ds = dcmread(handle, stop_before_pixels=True, force=True)
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError, AttributeError) as exc:
        raise Rejected(f"undecodable dataset ({type(exc).__name__})", code="undecodable") from None
    header = header_of(ds)
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not header.get(keyword):
            raise Rejected(f"dataset has no {keyword}", code=f"missing_{keyword}")
    return header


def content_hash(cipher: FieldCipher, source: bytes | Path) -> str:
    """Keyed SHA-256 (HMAC) of the bytes as received: equal only for identical bytes, meaningless
    without the installation's index key. (SHA-256 runs on the CPU's SHA extensions: half blake2b's cost.)"""
    digest = hmac.new(cipher.ring.index_key, digestmod=hashlib.sha256)
    if isinstance(source, Path):
        with source.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    else:
        digest.update(source)
    return digest.hexdigest()


class Ingest:
    """Durable, idempotent, audited ingest of instances and HL7 messages."""

    def __init__(self, *, db: Database, blobs: Blobs, cipher: FieldCipher, min_free_bytes: int, space_path: Path,
                 default_issuer: str = ""):
        self.db, self.blobs, self.cipher = db, blobs, cipher
        self.min_free_bytes, self.space_path = min_free_bytes, space_path
        self.default_issuer = default_issuer

    def check_space(self) -> None:
        if self.min_free_bytes and free_bytes(self.space_path) < self.min_free_bytes:
            raise Transient("free disk space below the configured floor", code="disk_floor")

    # --- DICOM -------------------------------------------------------------------------------------

    def store_instance(self, *, source: bytes | Path, calling_aet: str = "", assoc_id: str | None = None,
                       header: HeaderLike | None = None, actor: str = "listener") -> StoredInstance:
        """Store one encoded dataset (file meta + dataset, as received). Safe to call twice."""
        started = time.perf_counter()
        try:
            stored = self._store_instance(source, calling_aet, assoc_id, header, actor)
        except Rejected:
            metrics.INSTANCES.labels("rejected").inc()
            raise
        except Transient:
            metrics.INSTANCES.labels("transient").inc()
            raise
        metrics.INSTANCES.labels("duplicate" if stored.duplicate else "stored").inc()
        metrics.INGEST_SECONDS.labels("dicom").observe(time.perf_counter() - started)
        return stored

    def _store_instance(self, source: bytes | Path, calling_aet: str, assoc_id: str | None,
                        header: HeaderLike | None, actor: str) -> StoredInstance:
        self.check_space()
        hdr = header if header is not None else read_header(source)
        sop_index = self.cipher.blind_index(hdr.get("SOPInstanceUID"), scope="sop")
        digest = content_hash(self.cipher, source)
        with self.db.session() as session:
            existing = session.exec(select(Instance).join(Blob, col(Blob.id) == col(Instance.blob_id)).where(
                Instance.sop_uid_index == sop_index, col(Instance.current).is_(True),
                col(Blob.purged_at).is_(None))).first()  # a purged copy is no duplicate: stored again (indexer)
            if existing is not None and existing.content_hash == digest and existing.id is not None:
                return StoredInstance(existing.id, existing.study_id, existing.series_id, True, existing.version,
                                      False, False)
        for attempt in range(3):
            try:
                return self._store_new(hdr, source, sop_index, digest, calling_aet, assoc_id, actor)
            except IntegrityError:
                if attempt == 2:
                    raise Transient("concurrent writers kept colliding", code="contention") from None
        raise AssertionError("unreachable")

    def _store_new(self, header: HeaderLike, source: bytes | Path, sop_index: str, digest: str, calling_aet: str,
                   assoc_id: str | None, actor: str) -> StoredInstance:
        """Body and rows in one transaction (bodies that are rows, such as PostgreSQL's, need it)."""
        with self.db.session() as session:
            blob = self.blobs.write_body(session, kind="dicom", source=source)
            try:
                item = PreparedInstance(header, blob, sop_index, digest, calling_aet, assoc_id)
                results, dropped = BatchIndexer(session, self.cipher, self.default_issuer).run([item], actor=actor)
                if dropped:  # a duplicate: keep the first copy only
                    session.rollback()
            except BaseException:
                session.rollback()
                self.blobs.discard_body(session, blob.id)
                raise
        if dropped:
            with self.db.session() as session:
                self.blobs.discard_body(session, blob.id)
        stored = results[0]
        log.debug("instance stored", extra={"instance_id": stored.instance_id, "study_id": stored.study_id,
                                            "series_id": stored.series_id, "version": stored.version,
                                            "blob_id": blob.id, "calling_aet": calling_aet})
        return stored

    # --- DICOM instances the listener journaled: bodies and index rows, a batch at a time ---

    def index_received(self, items: Sequence[Received], *, actor: str = "listener") -> list[StoredInstance | Exception]:
        """Store a batch of instances that are already durable in the listener's journal.

        File bodies are written without a flush each, made durable together (``bodies.sync()``), and
        only then indexed in one transaction; row bodies (PostgreSQL) go into that transaction. A
        duplicate keeps the first copy. If the transaction fails, items are retried one by one.
        """
        if not items:
            return []
        if not self.can_group_commit:
            return [self._store_received(item, actor) for item in items]
        try:
            prepared = self.prepare_received(items)
        except OSError as exc:
            return [Transient(f"blob write failed ({type(exc).__name__})", code="blob_io")] * len(items)
        return self.commit_instances(prepared, actor=actor)

    def prepare_received(self, items: Sequence[Received]) -> list[PreparedInstance]:
        """Phase 1 of :meth:`index_received` (file bodies only): every body written, then one sync.
        On an OSError the bodies written so far are removed and it propagates."""
        prepared: list[PreparedInstance] = []
        try:
            for item in items:
                blob = self.blobs.write_record(None, kind="dicom", source=item.data, durable=False)  # type: ignore[arg-type]
                prepared.append(self._prepared(item, blob))
            self.blobs.bodies.sync()
        except OSError:
            for done in prepared:  # no index row can name these yet
                self.blobs.bodies.delete(None, done.blob.id)  # type: ignore[arg-type]
            raise
        return prepared

    def _prepared(self, item: Received, blob: Any) -> PreparedInstance:
        return PreparedInstance(item.header, blob, self.cipher.blind_index(item.header.get("SOPInstanceUID"), scope="sop"),
                                content_hash(self.cipher, item.data), item.calling_aet, item.assoc_id)

    def _store_received(self, item: Received, actor: str) -> StoredInstance | Exception:
        try:
            return self.store_instance(source=item.data, calling_aet=item.calling_aet, assoc_id=item.assoc_id,
                                       header=item.header, actor=actor)
        except Exception as exc:
            return exc

    # --- DICOM group commit: bodies written in parallel, index rows in one transaction ---

    @property
    def can_group_commit(self) -> bool:
        """Bodies written outside the index transaction need file bodies (PostgreSQL bodies are rows)."""
        return self.blobs.bodies.name == "local"

    def prepare_instance(self, *, source: bytes, header: HeaderLike | None = None, calling_aet: str = "",
                         assoc_id: str | None = None) -> PreparedInstance:
        """Phase 1: checks, then the encrypted body written and fsynced (no index row yet, no lock taken)."""
        self.check_space()
        hdr = header if header is not None else read_header(source)
        blob = self.blobs.write_body(None, kind="dicom", source=source)  # type: ignore[arg-type]
        return PreparedInstance(hdr, blob, self.cipher.blind_index(hdr.get("SOPInstanceUID"), scope="sop"),
                                content_hash(self.cipher, source), calling_aet, assoc_id)

    def commit_instances(self, items: Sequence[PreparedInstance], *, actor: str = "listener",
                         keep_on_transient: bool = False) -> list[StoredInstance | Exception]:
        """Phase 2: index every prepared instance in one transaction; each result follows the commit.

        A duplicate (same SOP Instance UID and bytes) keeps the first copy and drops the new body. If
        the transaction fails, the items are retried one by one so one bad item fails alone.

        ``keep_on_transient``: when the database is away (or a COMMIT's answer was lost, so it may have
        committed after all), every body stays and each result is the Transient error: the caller
        commits these same prepared bodies again, instead of writing new ones on every retry or
        deleting a body whose row the server did commit.
        """
        started = time.perf_counter()
        try:
            with self.db.session() as session:
                stored, dropped = BatchIndexer(session, self.cipher, self.default_issuer).run(items, actor=actor)
        except Exception as exc:
            if keep_on_transient and isinstance(exc, Transient):
                metrics.INSTANCES.labels("transient").inc(len(items))
                return [exc] * len(items)
            if len(items) > 1:
                return [r for item in items
                        for r in self.commit_instances([item], actor=actor, keep_on_transient=keep_on_transient)]
            self.blobs.discard_body(None, items[0].blob.id)  # type: ignore[arg-type]
            metrics.INSTANCES.labels("transient" if isinstance(exc, Transient) else "rejected").inc()
            return [exc]
        for blob_id in dropped:
            self.blobs.discard_body(None, blob_id)  # type: ignore[arg-type]
        for result in stored:
            metrics.INSTANCES.labels("duplicate" if result.duplicate else "stored").inc()
        metrics.INGEST_SECONDS.labels("dicom").observe(time.perf_counter() - started)
        return list(stored)

    # --- HL7 ---------------------------------------------------------------------------------------

    def dedup_key(self, header: Hl7Header, raw: bytes) -> str:
        """A resend is the same sender (MSH-3, MSH-4), the same MSH-10 and the same content after MSH (an
        engine may restamp MSH-7 when it resends). Another message that reuses a control id (senders
        restart their counters; test feeds reuse ``MSG00001``) is a new message, never dropped."""
        return self.cipher.blind_index(f"{_sender_msh10(header)}|{body_digest(raw)}", scope="msh10")

    def store_hl7(self, *, raw: bytes, header: Hl7Header, actor: str = "hl7") -> StoredMessage:
        """Store one raw message; a duplicate (see :meth:`dedup_key`) is reported, not stored again."""
        return self.store_hl7_batch([(raw, header)], actor=actor)[0]

    def store_hl7_batch(self, items: Sequence[tuple[bytes, Hl7Header]], *, actor: str = "hl7") -> list[StoredMessage]:
        """Group commit: the bodies first, then one transaction for every index row and audit event.

        File bodies are written in parallel (each fsynced: many flushes share one file-system commit)
        before the transaction; row bodies (PostgreSQL) go into it. Every result follows the commit.
        """
        if not items:
            return []
        started = time.perf_counter()
        try:
            self.check_space()
        except Transient:
            metrics.HL7_MESSAGES.labels("transient").inc(len(items))
            raise
        keys = [self.dedup_key(h, raw) for raw, h in items]
        bodies = self._hl7_bodies(items, keys) if self.can_group_commit else {}
        try:
            with self.db.session() as session:
                results = self._hl7_rows(session, items, keys, bodies, actor)
        except BaseException:
            for blob in bodies.values():
                self.blobs.discard_body(None, blob.id)  # type: ignore[arg-type]
            raise
        for blob in bodies.values():  # stored by someone else meanwhile: a duplicate after all
            self.blobs.discard_body(None, blob.id)  # type: ignore[arg-type]
        duplicates = sum(1 for _, dup in results if dup)
        log.debug("hl7 stored", extra={"count": len(results), "batch": duplicates})
        metrics.HL7_MESSAGES.labels("duplicate").inc(duplicates)
        metrics.HL7_MESSAGES.labels("stored").inc(len(results) - duplicates)
        metrics.INGEST_SECONDS.labels("hl7").observe(time.perf_counter() - started)
        return [StoredMessage(message_id=m.id, duplicate=dup) for m, dup in results]  # type: ignore[misc]

    def _hl7_bodies(self, items: Sequence[tuple[bytes, Hl7Header]], keys: list[str]) -> dict[int, Blob]:
        """Encrypted file bodies of the items not stored yet (first occurrence of each key), by item index."""
        with self.db.session() as session:
            known = set(session.exec(select(Hl7Message.dedup_index).where(
                col(Hl7Message.dedup_index).in_(set(keys)))).all())
        todo: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in known:
                todo.setdefault(key, i)
        indexes = list(todo.values())
        if not indexes:
            return {}

        def write(i: int) -> Blob:
            return self.blobs.write_body(None, kind="hl7", source=items[i][0])  # type: ignore[arg-type]

        with ThreadPoolExecutor(min(HL7_BODY_WRITERS, len(indexes)), thread_name_prefix="hl7-body") as pool:
            futures = {i: pool.submit(write, i) for i in indexes}
        done: dict[int, Blob] = {}
        failed: BaseException | None = None
        for i, future in futures.items():
            try:
                done[i] = future.result()
            except BaseException as exc:  # keep going: every written body must be known to be discarded
                failed = exc
        if failed is not None:
            for blob in done.values():  # no index row can name these yet
                self.blobs.bodies.delete(None, blob.id)  # type: ignore[arg-type]
            raise failed
        return done

    def legacy_key(self, header: Hl7Header) -> str:
        """The duplicate key of messages stored before 2026-12-07 (sender and MSH-10 only)."""
        return self.cipher.blind_index(_sender_msh10(header), scope="msh10")

    def _legacy_duplicates(self, session: Session, items: Sequence[tuple[bytes, Hl7Header]], keys: list[str],
                           found: dict[str, Hl7Message]) -> dict[int, Hl7Message]:
        """Items that resend a message stored under the old key: same sender and MSH-10, and the same
        content after MSH (read back from the stored body), so an upgrade does not store them twice."""
        todo = {i: self.legacy_key(h) for i, ((_, h), key) in enumerate(zip(items, keys, strict=True))
                if key not in found}
        if not todo:
            return {}
        rows = {m.dedup_index: m for m in session.exec(
            select(Hl7Message).where(col(Hl7Message.dedup_index).in_(set(todo.values())))).all()}
        out = {}
        for i, old in todo.items():
            row = rows.get(old)
            if row is not None and body_digest(self.blobs.read(session, row.blob_id)) == body_digest(items[i][0]):
                out[i] = row
        return out

    def _hl7_rows(self, session: Session, items: Sequence[tuple[bytes, Hl7Header]], keys: list[str],
                  bodies: dict[int, Blob], actor: str) -> list[tuple[Hl7Message, bool]]:
        """Index rows of a batch in ``session`` (one flush), then one audit event per stored message
        (appended together: one update of the chain's head).

        ``bodies`` are popped as they are used; what is left over was not needed (a duplicate)."""
        found = {m.dedup_index: m for m in session.exec(
            select(Hl7Message).where(col(Hl7Message.dedup_index).in_(set(keys)))).all()}
        legacy = self._legacy_duplicates(session, items, keys, found)
        results: list[tuple[Hl7Message, bool]] = []
        new: list[tuple[Hl7Message, Hl7Header, str]] = []
        for i, ((raw, header), key) in enumerate(zip(items, keys, strict=True)):
            if key in found or i in legacy:
                message = found[key] if key in found else legacy[i]
                message.duplicates = (message.duplicates or 0) + 1
                session.add(message)
                results.append((message, True))
                continue
            blob = bodies.pop(i, None) or self.blobs.write_body(session, kind="hl7", source=raw)
            session.add(blob)
            message = Hl7Message(
                dedup_index=key, control_id_enc=self.cipher.encrypt(header.control_id, column="hl7.control_id"),
                sending_application=header.sending_application[:64], sending_facility=header.sending_facility[:64],
                message_type=header.message_type[:16], trigger=header.trigger[:16], version=header.version[:16],
                blob_id=blob.id,
            )
            session.add(message)
            found[key] = message
            new.append((message, header, blob.id))
            results.append((message, False))
        session.flush()
        audit.append_many(session, [("ingest.hl7", actor, f"hl7:{message.id}",
                                     {"type": f"{header.message_type}^{header.trigger}", "blob_id": blob_id})
                                    for message, header, blob_id in new])
        session.flush()
        return results

