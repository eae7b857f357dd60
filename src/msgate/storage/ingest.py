"""The single write path of both listeners: store a DICOM instance or an HL7 message durably.

Each call writes the encrypted body (fsynced), then commits the index rows and an audit event in one
transaction. Only after it returns may a listener acknowledge (C-STORE 0x0000, HL7 AA/CA).
Both are idempotent on their natural key: SOP Instance UID (identical bytes are a duplicate; changed
bytes become a new version, audited), and MSH-10 + sending application + facility.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from msgate import metrics
from msgate.errors import Rejected, Transient
from msgate.storage import audit
from msgate.storage.blobs import Blobs, free_bytes
from msgate.storage.crypto import FieldCipher
from msgate.storage.db import Database
from msgate.storage.models import Blob, Hl7Message, Instance, Series, Study, utcnow

log = logging.getLogger(__name__)


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
class StoredInstance:
    instance_id: int
    study_id: int
    series_id: int
    duplicate: bool
    version: int
    new_series: bool
    new_study: bool


@dataclass(frozen=True)
class PreparedInstance:
    """An instance whose encrypted body is durable but not yet indexed (see ``Ingest.commit_instances``)."""

    ds: Dataset
    blob: Blob
    sop_index: str
    digest: str
    calling_aet: str
    assoc_id: str | None


@dataclass(frozen=True)
class StoredMessage:
    message_id: int
    duplicate: bool


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or value == "":
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def read_header(source: bytes | Path) -> Dataset:
    """Parse everything before the pixel data; Rejected for undecodable or incomplete datasets."""
    try:
        handle: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        ds = dcmread(handle, stop_before_pixels=True, force=True)
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError, AttributeError) as exc:
        raise Rejected(f"undecodable dataset ({type(exc).__name__})", code="undecodable") from None
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        try:
            present = bool(_text(ds, keyword))
        except Exception:  # pydicom decodes lazily; a corrupt element surfaces here
            raise Rejected("undecodable dataset (corrupt element)", code="undecodable") from None
        if not present:
            raise Rejected(f"dataset has no {keyword}", code=f"missing_{keyword}")
    return ds


def content_hash(cipher: FieldCipher, source: bytes | Path) -> str:
    digest = hashlib.blake2b(key=cipher.ring.index_key, digest_size=32)
    if isinstance(source, Path):
        with source.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    else:
        digest.update(source)
    return digest.hexdigest()


class Ingest:
    """Durable, idempotent, audited ingest of instances and HL7 messages."""

    def __init__(self, *, db: Database, blobs: Blobs, cipher: FieldCipher, min_free_bytes: int, space_path: Path):
        self.db, self.blobs, self.cipher = db, blobs, cipher
        self.min_free_bytes, self.space_path = min_free_bytes, space_path

    def check_space(self) -> None:
        if self.min_free_bytes and free_bytes(self.space_path) < self.min_free_bytes:
            raise Transient("free disk space below the configured floor", code="disk_floor")

    # --- DICOM -------------------------------------------------------------------------------------

    def store_instance(self, *, source: bytes | Path, calling_aet: str = "", assoc_id: str | None = None,
                       header: Dataset | None = None, actor: str = "listener") -> StoredInstance:
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
                        header: Dataset | None, actor: str) -> StoredInstance:
        self.check_space()
        ds = header if header is not None else read_header(source)
        sop_index = self.cipher.blind_index(_text(ds, "SOPInstanceUID"), scope="sop")
        digest = content_hash(self.cipher, source)
        with self.db.session() as session:
            existing = self._current(session, sop_index)
            if existing is not None and existing.content_hash == digest:
                return self._duplicate(existing)
        for attempt in range(3):
            try:
                return self._store_new(ds, source, sop_index, digest, calling_aet, assoc_id, actor)
            except IntegrityError:
                if attempt == 2:
                    raise Transient("concurrent writers kept colliding", code="contention") from None
                with self.db.session() as session:
                    existing = self._current(session, sop_index)
                    if existing is not None and existing.content_hash == digest:
                        return self._duplicate(existing)
        raise AssertionError("unreachable")

    @staticmethod
    def _current(session: Session, sop_index: str) -> Instance | None:
        return session.exec(
            select(Instance).where(Instance.sop_uid_index == sop_index, col(Instance.current).is_(True))
        ).first()

    @staticmethod
    def _duplicate(existing: Instance) -> StoredInstance:
        assert existing.id is not None
        return StoredInstance(existing.id, existing.study_id, existing.series_id, True, existing.version, False, False)

    def _store_new(self, ds: Dataset, source: bytes | Path, sop_index: str, digest: str, calling_aet: str,
                   assoc_id: str | None, actor: str) -> StoredInstance:
        with self.db.session() as session:
            blob = self.blobs.write_body(session, kind="dicom", source=source)
            try:
                session.add(blob)
                session.flush()
                stored = self._index_instance(session, ds, blob.id, sop_index, digest, blob.size, calling_aet, assoc_id)
                audit.append(session, kind="ingest.instance", actor=actor, subject=f"instance:{stored.instance_id}",
                             detail={"study_id": stored.study_id, "series_id": stored.series_id,
                                     "version": stored.version, "blob_id": blob.id, "calling_aet": calling_aet})
            except BaseException:
                session.rollback()
                self.blobs.discard_body(session, blob.id)
                raise
        log.debug("instance stored", extra={"instance_id": stored.instance_id, "study_id": stored.study_id,
                                            "series_id": stored.series_id, "version": stored.version,
                                            "blob_id": blob.id, "calling_aet": calling_aet})
        return stored

    # --- DICOM group commit (listener): bodies written in parallel, index rows in one transaction ---

    @property
    def can_group_commit(self) -> bool:
        """Bodies written outside the index transaction need file bodies (PostgreSQL bodies are rows)."""
        return self.blobs.bodies.name == "local"

    def prepare_instance(self, *, source: bytes, header: Dataset | None = None, calling_aet: str = "",
                         assoc_id: str | None = None) -> PreparedInstance:
        """Phase 1: checks, then the encrypted body written and fsynced (no index row yet, no lock taken)."""
        self.check_space()
        ds = header if header is not None else read_header(source)
        blob = self.blobs.write_body(None, kind="dicom", source=source)  # type: ignore[arg-type]
        return PreparedInstance(ds, blob, self.cipher.blind_index(_text(ds, "SOPInstanceUID"), scope="sop"),
                                content_hash(self.cipher, source), calling_aet, assoc_id)

    def commit_instances(self, items: Sequence[PreparedInstance], *,
                         actor: str = "listener") -> list[StoredInstance | Exception]:
        """Phase 2: index every prepared instance in one transaction; each result follows the commit.

        A duplicate (same SOP Instance UID and bytes) keeps the first copy and drops the new body. If
        the transaction fails, the items are retried one by one so one bad item fails alone.
        """
        started = time.perf_counter()
        dropped: list[str] = []
        try:
            with self.db.session() as session:
                results: list[StoredInstance | Exception] = []
                for item in items:
                    existing = self._current(session, item.sop_index)
                    if existing is not None and existing.content_hash == item.digest:
                        results.append(self._duplicate(existing))
                        dropped.append(item.blob.id)
                        continue
                    session.add(item.blob)
                    session.flush()
                    stored = self._index_instance(session, item.ds, item.blob.id, item.sop_index, item.digest,
                                                  item.blob.size, item.calling_aet, item.assoc_id)
                    audit.append(session, kind="ingest.instance", actor=actor, subject=f"instance:{stored.instance_id}",
                                 detail={"study_id": stored.study_id, "series_id": stored.series_id,
                                         "version": stored.version, "blob_id": item.blob.id,
                                         "calling_aet": item.calling_aet})
                    results.append(stored)
        except Exception as exc:
            if len(items) > 1:
                return [r for item in items for r in self.commit_instances([item], actor=actor)]
            self.blobs.discard_body(None, items[0].blob.id)  # type: ignore[arg-type]
            metrics.INSTANCES.labels("transient" if isinstance(exc, Transient) else "rejected").inc()
            return [exc]
        for blob_id in dropped:
            self.blobs.discard_body(None, blob_id)  # type: ignore[arg-type]
        for result in results:
            metrics.INSTANCES.labels("duplicate" if isinstance(result, StoredInstance) and result.duplicate
                                     else "stored").inc()
        metrics.INGEST_SECONDS.labels("dicom").observe(time.perf_counter() - started)
        return results

    def _index_instance(self, session: Session, ds: Dataset, blob_id: str, sop_index: str, digest: str, size: int,
                        calling_aet: str, assoc_id: str | None) -> StoredInstance:
        """Rows are locked in a fixed order (study, series, audit head) so writers cannot deadlock."""
        now = utcnow()
        study, new_study = self._study(session, ds, calling_aet)
        series, new_series = self._series(session, ds, study)
        previous = self._current(session, sop_index)
        version = 1
        if previous is not None:
            previous.current = False
            version = previous.version + 1
            session.add(previous)
            session.flush()
        else:
            series.instance_count += 1
            study.instance_count += 1
        study.last_received_at = series.last_received_at = now
        session.add(study)
        session.add(series)
        instance = Instance(
            study_id=study.id, series_id=series.id, sop_uid_index=sop_index,  # type: ignore[arg-type]
            sop_uid_enc=self.cipher.encrypt(_text(ds, "SOPInstanceUID"), column="instance.sop_uid"),
            sop_class_uid=_text(ds, "SOPClassUID")[:64],
            transfer_syntax=str(getattr(ds.file_meta, "TransferSyntaxUID", "") if hasattr(ds, "file_meta") else "")[:64],
            blob_id=blob_id, content_hash=digest, version=version, size=size,
            instance_number=_int(ds, "InstanceNumber"), calling_aet=calling_aet[:16], assoc_id=assoc_id,
            received_at=now,
        )
        session.add(instance)
        session.flush()
        assert instance.id is not None and study.id is not None and series.id is not None
        return StoredInstance(instance.id, study.id, series.id, False, version, new_series, new_study)

    def _study(self, session: Session, ds: Dataset, calling_aet: str) -> tuple[Study, bool]:
        enc, idx = self.cipher.encrypt, self.cipher.blind_index
        uid_index = idx(_text(ds, "StudyInstanceUID"), scope="study")
        study = session.exec(select(Study).where(Study.study_uid_index == uid_index).with_for_update()).first()
        if study is not None:
            modality = _text(ds, "Modality")
            if modality and modality not in study.modalities.split(","):
                study.modalities = ",".join(filter(None, [*study.modalities.split(","), modality]))[:64]
            return study, False
        accession, patient = _text(ds, "AccessionNumber"), _text(ds, "PatientID")
        issuer = _text(ds, "IssuerOfPatientID")
        study = Study(
            study_uid_index=uid_index, study_uid_enc=enc(_text(ds, "StudyInstanceUID"), column="study.study_uid"),
            accession_index=idx(accession, scope="accession") if accession else None,
            accession_enc=enc(accession or None, column="study.accession"),
            dicom_patient_index=idx(f"{issuer}|{patient}", scope="mrn") if patient else None,
            patient_id_enc=enc(patient or None, column="study.patient_id"),
            patient_name_enc=enc(_text(ds, "PatientName") or None, column="study.patient_name"),
            patient_birth_date_enc=enc(_text(ds, "PatientBirthDate") or None, column="study.birth_date"),
            patient_sex_enc=enc(_text(ds, "PatientSex") or None, column="study.sex"),
            study_date_enc=enc(_text(ds, "StudyDate") or None, column="study.study_date"),
            study_description_enc=enc(_text(ds, "StudyDescription") or None, column="study.description"),
            modalities=_text(ds, "Modality")[:16], calling_aet=calling_aet[:16],
        )
        session.add(study)
        session.flush()
        return study, True

    def _series(self, session: Session, ds: Dataset, study: Study) -> tuple[Series, bool]:
        uid_index = self.cipher.blind_index(_text(ds, "SeriesInstanceUID"), scope="series")
        series = session.exec(select(Series).where(Series.series_uid_index == uid_index).with_for_update()).first()
        if series is not None:
            return series, False
        enc = self.cipher.encrypt
        series = Series(
            study_id=study.id, series_uid_index=uid_index,  # type: ignore[arg-type]
            series_uid_enc=enc(_text(ds, "SeriesInstanceUID"), column="series.series_uid"),
            modality=_text(ds, "Modality")[:16], series_number=_int(ds, "SeriesNumber"),
            description_enc=enc(_text(ds, "SeriesDescription") or None, column="series.description"),
            protocol_enc=enc(_text(ds, "ProtocolName") or None, column="series.protocol"),
            sequence_name=_text(ds, "SequenceName")[:64], image_type=_text(ds, "ImageType")[:128],
            scanning_sequence=_text(ds, "ScanningSequence")[:64], inversion_time=_float(ds, "InversionTime"),
            body_part=_text(ds, "BodyPartExamined")[:64],
        )
        session.add(series)
        session.flush()
        return series, True

    # --- HL7 ---------------------------------------------------------------------------------------

    def dedup_key(self, header: Hl7Header) -> str:
        return self.cipher.blind_index(
            f"{header.sending_application}|{header.sending_facility}|{header.control_id}", scope="msh10")

    def store_hl7(self, *, raw: bytes, header: Hl7Header, actor: str = "hl7") -> StoredMessage:
        """Store one raw message; a duplicate (same MSH-10/3/4) is reported, not stored again."""
        return self.store_hl7_batch([(raw, header)], actor=actor)[0]

    def store_hl7_batch(self, items: Sequence[tuple[bytes, Hl7Header]], *, actor: str = "hl7") -> list[StoredMessage]:
        """Group commit: write every body, then one transaction. Every result follows the commit."""
        if not items:
            return []
        started = time.perf_counter()
        try:
            self.check_space()
        except Transient:
            metrics.HL7_MESSAGES.labels("transient").inc(len(items))
            raise
        keys = [self.dedup_key(h) for _, h in items]
        with self.db.session() as session:
            found = {m.dedup_index: m for m in session.exec(
                select(Hl7Message).where(col(Hl7Message.dedup_index).in_(set(keys)))).all()}
            written: list[str] = []
            try:
                results = [self._one_hl7(session, raw, header, key, found, written, actor)
                           for (raw, header), key in zip(items, keys, strict=True)]
                session.flush()
            except BaseException:
                session.rollback()
                for blob_id in written:
                    self.blobs.discard_body(session, blob_id)
                raise
        log.debug("hl7 stored", extra={"count": len(results), "batch": sum(1 for _, dup in results if dup)})
        duplicates = sum(1 for _, dup in results if dup)
        metrics.HL7_MESSAGES.labels("duplicate").inc(duplicates)
        metrics.HL7_MESSAGES.labels("stored").inc(len(results) - duplicates)
        metrics.INGEST_SECONDS.labels("hl7").observe(time.perf_counter() - started)
        return [StoredMessage(message_id=m.id, duplicate=dup) for m, dup in results]  # type: ignore[misc]

    def _one_hl7(self, session: Session, raw: bytes, header: Hl7Header, key: str, found: dict[str, Hl7Message],
                 written: list[str], actor: str) -> tuple[Hl7Message, bool]:
        if key in found:
            message = found[key]
            message.duplicates += 1
            session.add(message)
            return message, True
        blob = self.blobs.put(session, kind="hl7", source=raw)
        written.append(blob.id)
        message = Hl7Message(
            dedup_index=key, control_id_enc=self.cipher.encrypt(header.control_id, column="hl7.control_id"),
            sending_application=header.sending_application[:64], sending_facility=header.sending_facility[:64],
            message_type=header.message_type[:16], trigger=header.trigger[:16], version=header.version[:16],
            blob_id=blob.id,
        )
        session.add(message)
        session.flush()
        found[key] = message
        audit.append(session, kind="ingest.hl7", actor=actor, subject=f"hl7:{message.id}",
                     detail={"type": f"{header.message_type}^{header.trigger}", "blob_id": blob.id})
        return message, False


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
