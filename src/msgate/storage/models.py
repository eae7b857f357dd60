"""SQL index tables (sqlmodel). The same schema runs on SQLite (embedded) and PostgreSQL.

PHI columns end in ``_enc`` and hold :class:`~msgate.storage.crypto.FieldCipher` ciphertexts; the
lookups that need equality use a keyed HMAC blind index (columns ending in ``_index``). Non-PHI
attributes that drive routing (modality, SOP class, sequence names) stay plain.
Blob bodies live in the blob store; ``blob`` holds their wrapped data keys.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, LargeBinary, TypeDecorator, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both backends (SQLite returns naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


def _ts(nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UtcDateTime(), nullable=nullable, index=index))


def _created() -> Any:
    return Field(default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False, index=True))


def _bin() -> Any:
    return Field(default=None, sa_column=Column(LargeBinary, nullable=True))


def _json() -> Any:
    return Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Blob(SQLModel, table=True):
    """One encrypted object. ``wrapped_dek`` is its data key wrapped by KEK ``kek_id``."""

    id: str = Field(primary_key=True, max_length=32)
    kind: str = Field(max_length=32, index=True)
    backend: str = Field(max_length=16)
    kek_id: str = Field(max_length=64, index=True)
    wrapped_dek: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    size: int
    stored_size: int
    created_at: datetime = _created()
    purged_at: datetime | None = _ts()


class DataKey(SQLModel, table=True):
    """A non-blob data key (e.g. the PHI field key), wrapped by KEK ``kek_id``."""

    __tablename__ = "data_key"
    id: str = Field(primary_key=True, max_length=32)
    purpose: str = Field(max_length=32, index=True)
    kek_id: str = Field(max_length=64, index=True)
    wrapped: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = _created()


class BlobChunk(SQLModel, table=True):
    """Ciphertext chunks of the PostgreSQL blob backend, streamed in and out one row at a time."""

    __tablename__ = "blob_chunk"
    blob_id: str = Field(primary_key=True, max_length=32)
    seq: int = Field(primary_key=True)
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class Patient(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name_enc: bytes | None = _bin()
    birth_date_enc: bytes | None = _bin()
    sex_enc: bytes | None = _bin()
    merged_into_id: int | None = Field(default=None, foreign_key="patient.id")
    created_at: datetime = _created()
    updated_at: datetime | None = _ts()


class PatientIdentifier(SQLModel, table=True):
    """An MRN (or other id) with its assigning authority; ``id_index`` = HMAC(authority|value)."""

    __tablename__ = "patient_identifier"
    id: int | None = Field(default=None, primary_key=True)
    patient_id: int = Field(foreign_key="patient.id", index=True)
    id_index: str = Field(max_length=64, unique=True)
    value_enc: bytes | None = _bin()
    authority: str = Field(default="", max_length=64)
    id_type: str = Field(default="MR", max_length=16)


class Association(SQLModel, table=True):
    """One DICOM association, for tracing (no PHI: AE titles and addresses only)."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    calling_aet: str = Field(max_length=16, index=True)
    peer_host: str = Field(default="", max_length=64)
    started_at: datetime = _created()
    ended_at: datetime | None = _ts()
    outcome: str = Field(default="open", max_length=16)
    instances: int = 0
    failures: int = 0


class Study(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    study_uid_index: str = Field(max_length=64, unique=True)
    study_uid_enc: bytes | None = _bin()
    accession_index: str | None = Field(default=None, max_length=64, index=True)
    accession_enc: bytes | None = _bin()
    dicom_patient_index: str | None = Field(default=None, max_length=64, index=True)
    patient_id_enc: bytes | None = _bin()
    patient_name_enc: bytes | None = _bin()
    patient_birth_date_enc: bytes | None = _bin()
    patient_sex_enc: bytes | None = _bin()
    study_date_enc: bytes | None = _bin()
    study_description_enc: bytes | None = _bin()
    patient_id: int | None = Field(default=None, foreign_key="patient.id", index=True)
    modalities: str = Field(default="", max_length=64)
    state: str = Field(default="receiving", max_length=16, index=True)
    route: str | None = Field(default=None, max_length=32)
    calling_aet: str = Field(default="", max_length=16)
    instance_count: int = 0
    first_received_at: datetime = _created()
    last_received_at: datetime | None = _ts(index=True)
    ready_at: datetime | None = _ts()
    runs: int = 0
    delivered_at: datetime | None = _ts()
    purged_at: datetime | None = _ts()


class Series(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="study.id", index=True)
    series_uid_index: str = Field(max_length=64, unique=True)
    series_uid_enc: bytes | None = _bin()
    modality: str = Field(default="", max_length=16)
    series_number: int | None = None
    description_enc: bytes | None = _bin()
    protocol_enc: bytes | None = _bin()
    sequence_name: str = Field(default="", max_length=64)
    image_type: str = Field(default="", max_length=128)
    scanning_sequence: str = Field(default="", max_length=64)
    inversion_time: float | None = None
    body_part: str = Field(default="", max_length=64)
    role: str | None = Field(default=None, max_length=16)
    instance_count: int = 0
    frame_count: int = 0  # image frames over the series' instances (NumberOfFrames, 1 for single-frame)
    first_received_at: datetime = _created()
    last_received_at: datetime | None = _ts()


class Instance(SQLModel, table=True):
    """One received object, stored as received. A changed re-send becomes a new ``version``."""

    __table_args__ = (UniqueConstraint("sop_uid_index", "version"),)
    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="study.id", index=True)
    series_id: int = Field(foreign_key="series.id", index=True)
    sop_uid_index: str = Field(max_length=64, index=True)
    sop_uid_enc: bytes | None = _bin()
    sop_class_uid: str = Field(max_length=64)
    transfer_syntax: str = Field(max_length=64)
    blob_id: str = Field(foreign_key="blob.id", max_length=32)
    content_hash: str = Field(max_length=64)
    # What the scheduler's change check hashes for this instance: a new version that only re-encodes the one
    # it replaced keeps that one's identity (storage.reencoded); a changed one has its content_hash. NULL on a
    # first version (content_hash) and on a later one not decided yet (taken as changed).
    change_hash: str | None = Field(default=None, max_length=64)
    version: int = 1
    current: bool = True
    size: int = 0
    instance_number: int | None = None
    calling_aet: str = Field(default="", max_length=16)
    assoc_id: str | None = Field(default=None, max_length=32, index=True)
    received_at: datetime = _created()


class Hl7Message(SQLModel, table=True):
    """One inbound HL7 v2 message, stored raw and encrypted; deduplicated on MSH-10 + MSH-3/4."""

    __tablename__ = "hl7_message"
    id: int | None = Field(default=None, primary_key=True)
    dedup_index: str = Field(max_length=64, unique=True)
    control_id_enc: bytes | None = _bin()
    sending_application: str = Field(default="", max_length=64)
    sending_facility: str = Field(default="", max_length=64)
    message_type: str = Field(default="", max_length=16, index=True)
    trigger: str = Field(default="", max_length=16)
    version: str = Field(default="", max_length=16)
    blob_id: str = Field(foreign_key="blob.id", max_length=32)
    received_at: datetime = _created()
    ack_code: str | None = Field(default=None, max_length=4)
    ack_at: datetime | None = _ts()
    validation: dict[str, Any] = _json()
    mapping_state: str = Field(default="pending", max_length=16, index=True)
    mapping_error: str | None = Field(default=None, max_length=256)
    patient_id: int | None = Field(default=None, foreign_key="patient.id", index=True)
    duplicates: int = 0


class Order(SQLModel, table=True):
    __tablename__ = "order_"
    id: int | None = Field(default=None, primary_key=True)
    patient_id: int | None = Field(default=None, foreign_key="patient.id", index=True)
    accession_index: str | None = Field(default=None, max_length=64, index=True)
    accession_enc: bytes | None = _bin()
    placer_index: str | None = Field(default=None, max_length=64, index=True)
    placer_enc: bytes | None = _bin()
    # EI.2-EI.4 (namespace, universal id, its type) of the placer / filler number, as the order feed sent
    # them (a JSON list, encrypted), sent back in ORC-2/3 and OBR-2/3; NULL for orders stored before 0008
    placer_authority_enc: bytes | None = _bin()
    filler_index: str | None = Field(default=None, max_length=64, index=True)
    filler_enc: bytes | None = _bin()
    filler_authority_enc: bytes | None = _bin()
    status: str = Field(default="", max_length=8)
    procedure_code: str = Field(default="", max_length=64)
    ordered_at: datetime | None = _ts()
    message_id: int | None = Field(default=None, foreign_key="hl7_message.id")
    updated_at: datetime = _created()


class Observation(SQLModel, table=True):
    """One result value. ``value_enc`` is encrypted; a correction (C) replaces it and X/W/D withdraw it, in
    place (``observed_at`` stays that of the original; matching: :mod:`msgate.hl7.observations`)."""

    id: int | None = Field(default=None, primary_key=True)
    patient_id: int = Field(foreign_key="patient.id", index=True)
    feature: str | None = Field(default=None, max_length=32, index=True)
    code: str = Field(max_length=64)
    code_system: str = Field(default="", max_length=16)
    value_enc: bytes | None = _bin()
    value_type: str = Field(default="", max_length=4)
    unit: str = Field(default="", max_length=32)
    status: str = Field(default="F", max_length=2)
    observed_at: datetime | None = _ts(index=True)
    sub_id: str = Field(default="", max_length=20)  # OBX-4: tells repeated results of one code apart
    withdrawn: bool = False
    message_id: int | None = Field(default=None, foreign_key="hl7_message.id")
    updated_at: datetime = _created()


class Job(SQLModel, table=True):
    """One inference run. ``content_key`` = study UID + series-set hash + EHR hash + model version (what the
    case was planned with); ``idem_key`` = that content key + the job it supersedes, unique: one job per
    content per place in the study's chain, so two schedulers never create two jobs for one change, and a
    content that comes back after a correction (a corrected correction) still gets its job. Jobs stored
    before revision 0009 have ``content_key`` = ``idem_key``. ``planned_ready_at``: the latest
    ``Study.ready_at`` at which the study was planned again to this job's content (nothing to run), so the
    scheduler does not plan it again until the study is ready again."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    study_id: int = Field(foreign_key="study.id", index=True)
    idem_key: str = Field(max_length=64, unique=True)
    content_key: str | None = Field(default=None, max_length=64)
    planned_ready_at: datetime | None = _ts()
    state: str = Field(default="queued", max_length=16, index=True)
    model_version: str = Field(default="", max_length=64)
    flags: dict[str, Any] = _json()
    stages: dict[str, Any] = _json()
    error: str | None = Field(default=None, max_length=512)
    supersedes_id: str | None = Field(default=None, max_length=32)
    attempts: int = 0
    created_at: datetime = _created()
    published_at: datetime | None = _ts()
    started_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()


class Result(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="job.id", unique=True, max_length=32)
    blob_id: str = Field(foreign_key="blob.id", max_length=32)
    created_at: datetime = _created()


OUTBOX_OPEN_STATES = ("pending", "sending", "dead")
"""Outbox entry states of a result still to deliver (a dead letter waits for an operator)."""


class OutboxEntry(SQLModel, table=True):
    __tablename__ = "outbox"
    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    job_id: str | None = Field(default=None, foreign_key="job.id", max_length=32, index=True)
    kind: str = Field(max_length=16)
    destination: str = Field(max_length=64)
    blob_id: str = Field(foreign_key="blob.id", max_length=32)
    state: str = Field(default="pending", max_length=16, index=True)
    attempts: int = 0
    next_attempt_at: datetime = _created()
    last_error: str | None = Field(default=None, max_length=512)
    created_at: datetime = _created()
    delivered_at: datetime | None = _ts()


class OutboxAttempt(SQLModel, table=True):
    """One send attempt. ``detail`` holds coded parts only (MSH-10, ACK and ERR codes); the engine's free
    text, which may name the patient, is in ``peer_text_enc`` (column ``outbox_attempt.peer_text``)."""

    __tablename__ = "outbox_attempt"
    id: int | None = Field(default=None, primary_key=True)
    entry_id: str = Field(foreign_key="outbox.id", max_length=32, index=True)
    started_at: datetime = _created()
    outcome: str = Field(max_length=16)
    peer_status: str = Field(default="", max_length=64)
    detail: str = Field(default="", max_length=512)
    peer_text_enc: bytes | None = _bin()


class AuditEvent(SQLModel, table=True):
    """Append-only, hash-chained: ``hash = sha256(prev_hash | canonical(event))``. No plaintext PHI."""

    __tablename__ = "audit_event"
    seq: int = Field(primary_key=True)
    ts: datetime = _created()
    kind: str = Field(max_length=32, index=True)
    actor: str = Field(max_length=64)
    subject: str = Field(default="", max_length=128, index=True)
    detail: dict[str, Any] = _json()
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditHead(SQLModel, table=True):
    """The chain's tip, one row, locked by each append so concurrent writers cannot fork the chain."""

    __tablename__ = "audit_head"
    id: int = Field(default=1, primary_key=True)
    seq: int = 0
    hash: str = Field(default="0" * 64, max_length=64)


class Heartbeat(SQLModel, table=True):
    """Each running role's last sign of life, written every few seconds by ``msgate serve``."""

    role: str = Field(primary_key=True, max_length=16)
    instance: str = Field(primary_key=True, max_length=96)
    started_at: datetime = _created()
    beat_at: datetime = _created()
    info: dict[str, Any] = _json()
