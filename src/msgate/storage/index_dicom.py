"""Index rows for a batch of received DICOM instances, in the caller's transaction.

One batch is what the listener's group commit gathered (often one study's consecutive instances from
several associations): the current versions of its SOP Instance UIDs are read with one query, each
study and series row is looked up (and locked) once, blob and instance rows are inserted with one
multi-row statement each, the counters are updated once per series and study, and the audit chain
gets one ``ingest.instance`` event per instance through one head update (:func:`audit.append_many`).
The pydicom header is parsed only for an instance that creates a study or series.

Rows are locked in a fixed order (study, series, audit head) so concurrent writers cannot deadlock.

A series UID is unique over the index, and one series belongs to one study. An instance that names a
series of another study (the PACS merged two studies or moved a series to the right one: same Series and
SOP Instance UIDs, another Study Instance UID) moves the whole series there, with all its instance rows
and counts (:meth:`BatchIndexer._move`, audited ``series.moved``), and reopens the study it left so that
study is decided again. It used to be filed under the old study's series: the new study had no series
and never ran.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from pydicom.dataset import Dataset
from sqlalchemy import insert, select, update
from sqlmodel import Session, col

from msgate.storage import audit, repo_studies
from msgate.storage.blobs import BlobRecord
from msgate.storage.crypto import FieldCipher
from msgate.storage.models import Blob, Instance, Series, Study, utcnow

log = logging.getLogger(__name__)
INTEGER_RANGE = (-(1 << 31), (1 << 31) - 1)  # the INTEGER columns (32 bits), and the range DICOM allows IS


class HeaderLike(Protocol):
    transfer_syntax: str

    def get(self, keyword: str) -> str: ...
    def dataset(self) -> Dataset: ...


@dataclass(frozen=True)
class StoredInstance:
    instance_id: int
    study_id: int
    series_id: int
    duplicate: bool
    version: int
    new_series: bool
    new_study: bool
    moved_from: int | None = None  # the study its series left when this instance moved it (a PACS merge)


@dataclass(frozen=True)
class PreparedInstance:
    """An instance whose encrypted body is durable but not yet indexed."""

    header: HeaderLike
    blob: Blob | BlobRecord
    sop_index: str
    digest: str
    calling_aet: str
    assoc_id: str | None


@dataclass
class _Counts:
    instances: int = 0
    frames: int = 0
    last: Any = None
    modalities: set[str] = field(default_factory=set)


def frames(header: HeaderLike) -> int:
    """Image frames in one instance: NumberOfFrames (IS), 1 when absent or unreadable."""
    try:
        return min(max(1, int(float(header.get("NumberOfFrames") or 1))), 1 << 20)
    except (ValueError, OverflowError):  # "1e999", "inf": not a frame count
        return 1


def text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or value == "":
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


class BatchIndexer:
    """Indexes one batch (``run``); a new object per transaction."""

    def __init__(self, session: Session, cipher: FieldCipher, default_issuer: str = "") -> None:
        self.session, self.cipher, self.default_issuer = session, cipher, default_issuer
        self.studies: dict[str, tuple[int, bool]] = {}  # uid index -> (id, created here)
        self.series: dict[str, int] = {}  # uid index -> id
        self.owner: dict[int, int] = {}  # series id -> the study it belongs to now
        self.study_counts: dict[int, _Counts] = {}
        self.series_counts: dict[int, _Counts] = {}
        self.moves: list[tuple[str, str, str, dict[str, Any]]] = []  # this round's series.moved events
        self.left: set[int] = set()  # studies a series left in this round

    def run(self, items: Sequence[PreparedInstance], *, actor: str) -> tuple[list[StoredInstance], list[str]]:
        """(one result per item, blob ids whose bodies are duplicates and can be discarded).

        An instance sent twice within one batch goes into a later round, so that it sees the first."""
        results: dict[int, StoredInstance] = {}
        dropped: list[str] = []
        pending = list(enumerate(items))
        while pending:
            seen: set[str] = set()
            this_round: list[tuple[int, PreparedInstance]] = []
            later: list[tuple[int, PreparedInstance]] = []
            for n, item in pending:
                (later if item.sop_index in seen else this_round).append((n, item))
                seen.add(item.sop_index)
            done, gone = self._round([item for _, item in this_round], actor=actor)
            results.update({n: r for (n, _), r in zip(this_round, done, strict=True)})
            dropped.extend(gone)
            pending = later
        return [results[n] for n in range(len(items))], dropped

    def _round(self, items: Sequence[PreparedInstance], *, actor: str) -> tuple[list[StoredInstance], list[str]]:
        current, bodiless = self._current([i.sop_index for i in items])
        replayed = self._replayed([i for i in items if (seen := current.get(i.sop_index)) is not None
                                   and seen[1] != i.digest and i.assoc_id])
        now = utcnow()
        plans: list[tuple[PreparedInstance, int, int, int, bool, bool] | StoredInstance] = []
        moved: dict[int, int] = {}  # plan -> the study its instance moved its series from
        dropped: list[str] = []
        for item in items:
            seen = current.get(item.sop_index)
            if seen is not None and seen[1] == item.digest and not _restores(item, bodiless):
                plans.append(StoredInstance(seen[0], seen[3], seen[4], True, seen[2], False, False))
                dropped.append(item.blob.id)
                continue
            earlier = replayed.get((item.sop_index, item.digest, item.assoc_id or ""))
            if earlier is not None:  # indexed before from this same delivery: a journal replay, not a version
                plans.append(earlier)
                dropped.append(item.blob.id)
                continue
            study_id, new_study = self._study(item.header, item.calling_aet)
            series_id, new_series, moved_from = self._series(item.header, study_id, actor)
            if moved_from is not None:
                moved[len(plans)] = moved_from
            version = 1
            if seen is not None:
                self.session.execute(update(Instance).where(col(Instance.id) == seen[0]).values(current=False))
                version = seen[2] + 1
                if not new_study:
                    self._reidentify(study_id, item.header, actor)
            self._count(self.study_counts, study_id, now, item.header.get("Modality"), seen is None)
            self._count(self.series_counts, series_id, now, "", seen is None, frames(item.header))
            current[item.sop_index] = (-1, item.digest, version, study_id, series_id)
            bodiless.pop(item.sop_index, None)
            plans.append((item, study_id, series_id, version, new_study, new_series))
        # an instance planned before a later one of this round moved its series goes with the series
        plans = [p if isinstance(p, StoredInstance) else (p[0], self.owner[p[2]], p[2], p[3], p[4], p[5])
                 for p in plans]
        stored = self._insert([p for p in plans if not isinstance(p, StoredInstance)], now)
        results = [p if isinstance(p, StoredInstance) else next(stored) for p in plans]
        results = [replace(r, moved_from=moved[n]) if n in moved else r for n, r in enumerate(results)]
        self._update_counts()
        audit.append_many(self.session, [*self.moves, *[
            ("ingest.instance", actor, f"instance:{r.instance_id}",
             {"study_id": r.study_id, "series_id": r.series_id, "version": r.version, "blob_id": item.blob.id,
              "calling_aet": item.calling_aet})
            for r, item in zip(results, items, strict=True) if not r.duplicate]])
        for study_id in sorted(self.left):  # decided again without the series (the tracker, or the next start)
            repo_studies.reopen(self.session, study_id=study_id, actor=actor)
        self.moves, self.left = [], set()
        return results, dropped

    def _reidentify(self, study_id: int, header: HeaderLike, actor: str) -> None:
        """A corrected instance (a new version) whose PatientID, issuer or accession number differ from the
        study's: the PACS fixed a wrong patient or order and sent the study again. The study row kept the
        first identity, so the new run linked the first patient's EHR while the SR and ORU named the new
        one. The identity columns now follow the correction, and the study is linked again from them."""
        study = self.session.get(Study, study_id)
        if study is None:
            return
        fresh = identity(header.dataset(), self.cipher, self.default_issuer)
        if (fresh["dicom_patient_index"], fresh["accession_index"]) == (study.dicom_patient_index,
                                                                        study.accession_index):
            return
        for column, value in fresh.items():
            setattr(study, column, value)
        study.patient_id = None  # linked again (identifier, then order) when the study is planned
        self.session.add(study)
        audit.append(self.session, kind="study.reidentified", actor=actor, subject=f"study:{study_id}",
                     detail={"reason": "a corrected instance names another patient or order"})

    def _replayed(self, items: list[PreparedInstance]) -> dict[tuple[str, str, str], StoredInstance]:
        """Earlier (not current) versions with the same bytes from the same association as ``items``.

        The journal is replayed after a crash or an indexer restart, and records indexed before it come
        again. A record matching the current version is a duplicate already; one matching an older
        version received on the same association was indexed before (v1, then v2, then v1 replayed) and
        must not become a new version: that reverted a corrected instance."""
        if not items:
            return {}
        rows = self.session.execute(
            select(Instance.id, Instance.sop_uid_index, Instance.content_hash, Instance.assoc_id,  # type: ignore[call-overload]
                   Instance.version, Instance.study_id, Instance.series_id)
            .where(col(Instance.sop_uid_index).in_({i.sop_index for i in items}),
                   col(Instance.assoc_id).in_({i.assoc_id for i in items}), col(Instance.current).is_(False))).all()
        return {(r[1], r[2], r[3]): StoredInstance(r[0], r[5], r[6], True, r[4], False, False) for r in rows}

    def _current(self, sop_indexes: list[str]) -> tuple[dict[str, tuple[int, str, int, int, int]],
                                                        dict[str, str | None]]:
        """The current versions (id, content hash, version, study, series) by SOP index, and of those whose
        body retention purged, the association that delivered them."""
        rows = self.session.execute(
            select(Instance.id, Instance.sop_uid_index, Instance.content_hash, Instance.version,  # type: ignore[call-overload]
                   Instance.study_id, Instance.series_id, Blob.purged_at, Instance.assoc_id)
            .join(Blob, col(Blob.id) == col(Instance.blob_id))
            .where(col(Instance.sop_uid_index).in_(set(sop_indexes)), col(Instance.current).is_(True))).all()
        return ({r[1]: (r[0], r[2], r[3], r[4], r[5]) for r in rows},
                {r[1]: r[7] for r in rows if r[6] is not None})

    def _insert(self, plans: list[tuple[PreparedInstance, int, int, int, bool, bool]], now: Any) -> Any:
        if not plans:
            return iter(())
        conn = self.session.connection()
        conn.execute(_BLOB, [_blob_row(p[0].blob) for p in plans])
        enc = self.cipher.encrypt
        rows = [{"study_id": study_id, "series_id": series_id, "sop_uid_index": item.sop_index,
                 "sop_uid_enc": enc(item.header.get("SOPInstanceUID"), column="instance.sop_uid"),
                 "sop_class_uid": item.header.get("SOPClassUID")[:64],
                 "transfer_syntax": item.header.transfer_syntax[:64], "blob_id": item.blob.id,
                 "content_hash": item.digest, "version": version, "current": True, "size": item.blob.size,
                 "instance_number": _int(item.header.get("InstanceNumber"), column="instance_number",
                                         study_id=study_id, series_id=series_id),
                 "calling_aet": item.calling_aet[:16],
                 "assoc_id": item.assoc_id, "received_at": now}
                for item, study_id, series_id, version, _, _ in plans]
        ids = conn.execute(_INSTANCE, rows).scalars().all()
        return iter([StoredInstance(int(i), p[1], p[2], False, p[3], p[5], p[4]) for i, p in zip(ids, plans, strict=True)])

    @staticmethod
    def _count(table: dict[int, _Counts], key: int, now: Any, modality: str, new: bool, frames: int = 1) -> None:
        counts = table.setdefault(key, _Counts())
        counts.instances += 1 if new else 0
        counts.frames += frames if new else 0
        counts.last = now
        if modality:
            counts.modalities.add(modality)

    def _update_counts(self) -> None:
        for series_id, counts in self.series_counts.items():
            self.session.execute(update(Series).where(col(Series.id) == series_id).values(
                instance_count=col(Series.instance_count) + counts.instances,
                frame_count=col(Series.frame_count) + counts.frames, last_received_at=counts.last))
        for study_id, counts in self.study_counts.items():
            study = self.session.get(Study, study_id)
            assert study is not None
            known = [m for m in study.modalities.split(",") if m]
            study.modalities = ",".join(known + sorted(counts.modalities - set(known)))[:64]
            study.instance_count += counts.instances
            if counts.last is not None:  # received here, not only left by a series that moved
                study.last_received_at = counts.last
                study.purged_at = None  # stored bodies again: retention must purge them after the next delivery
            self.session.add(study)
        self.session.flush()
        self.series_counts.clear()  # applied: a later round of this batch counts only its own instances
        self.study_counts.clear()

    def _study(self, header: HeaderLike, calling_aet: str) -> tuple[int, bool]:
        uid_index = self.cipher.blind_index(header.get("StudyInstanceUID"), scope="study")
        if uid_index in self.studies:
            return self.studies[uid_index][0], False
        found = self.session.execute(select(Study.id).where(Study.study_uid_index == uid_index)  # type: ignore[call-overload]
                                     .with_for_update()).first()
        if found is not None:
            self.studies[uid_index] = (int(found[0]), False)
            return int(found[0]), False
        study = new_study(header.dataset(), self.cipher, uid_index=uid_index, calling_aet=calling_aet,
                          default_issuer=self.default_issuer)
        self.session.add(study)
        self.session.flush()
        assert study.id is not None
        self.studies[uid_index] = (study.id, True)
        return study.id, True

    def _series(self, header: HeaderLike, study_id: int, actor: str) -> tuple[int, bool, int | None]:
        """(series id, created here, the study it left when this instance moved it to ``study_id``)."""
        uid_index = self.cipher.blind_index(header.get("SeriesInstanceUID"), scope="series")
        if uid_index in self.series:
            series_id = self.series[uid_index]
            return series_id, False, self._move(series_id, study_id, actor)
        found = self.session.execute(select(Series.id, Series.study_id)  # type: ignore[call-overload]
                                     .where(col(Series.series_uid_index) == uid_index)).first()
        if found is not None:
            series_id = int(found[0])
            if int(found[1]) != study_id:  # the study it leaves is locked before the series (the fixed order)
                self.session.get(Study, int(found[1]), with_for_update=True)
            owner = self.session.execute(select(Series.study_id)  # type: ignore[call-overload]
                                         .where(col(Series.id) == series_id).with_for_update()).scalar_one()
            self.series[uid_index], self.owner[series_id] = series_id, int(owner)
            return series_id, False, self._move(series_id, study_id, actor)
        series = new_series(header.dataset(), self.cipher, uid_index=uid_index, study_id=study_id)
        self.session.add(series)
        self.session.flush()
        assert series.id is not None
        self.series[uid_index], self.owner[series.id] = series.id, study_id
        return series.id, True, None

    def _move(self, series_id: int, study_id: int, actor: str) -> int | None:
        """Move a series that belongs to another study to ``study_id``; returns the study it left, or None.

        A PACS that merges or splits studies keeps the Series and SOP Instance UIDs and changes the Study
        Instance UID, and moves whole series, so the series goes with every instance row (all versions:
        retention of the study it left must not purge the bodies it now serves) and its counts: its
        instances leave that study's count and join this one's (the series keeps its own counts)."""
        old = self.owner[series_id]
        if old == study_id:
            return None
        row = self.session.execute(select(Series.instance_count, Series.frame_count)  # type: ignore[call-overload]
                                   .where(col(Series.id) == series_id)).one()
        pending = self.series_counts.get(series_id, _Counts())  # counted in this round, not yet written
        instances, frames = int(row[0]) + pending.instances, int(row[1]) + pending.frames
        self.session.execute(update(Series).where(col(Series.id) == series_id).values(study_id=study_id))
        self.session.execute(update(Instance).where(col(Instance.series_id) == series_id).values(study_id=study_id))
        self.study_counts.setdefault(old, _Counts()).instances -= instances
        self.study_counts.setdefault(study_id, _Counts()).instances += instances
        self.owner[series_id] = study_id
        self.left.add(old)
        self.left.discard(study_id)  # moved back within the batch: that study is receiving anyway
        self.moves.append(("series.moved", actor, f"series:{series_id}",
                           {"from_study_id": old, "to_study_id": study_id, "instances": instances, "frames": frames}))
        log.info("series moved to another study", extra={"series_id": series_id, "study_id": study_id,
                                                          "count": instances})
        return old


def new_study(ds: Dataset, cipher: FieldCipher, *, uid_index: str, calling_aet: str, default_issuer: str = "") -> Study:
    """The study row of a first instance. ``default_issuer`` stands in for an absent IssuerOfPatientID in
    the identifier index: the HL7 feed indexes MRNs under their assigning authority (PID-3 CX-4), so a
    scanner's bare PatientID linked to no patient and every case ran without its EHR."""
    enc = cipher.encrypt
    return Study(
        study_uid_index=uid_index, study_uid_enc=enc(text(ds, "StudyInstanceUID"), column="study.study_uid"),
        **identity(ds, cipher, default_issuer),
        study_date_enc=enc(text(ds, "StudyDate") or None, column="study.study_date"),
        study_description_enc=enc(text(ds, "StudyDescription") or None, column="study.description"),
        modalities="", calling_aet=calling_aet[:16],
    )


def identity(ds: Dataset, cipher: FieldCipher, default_issuer: str = "") -> dict[str, Any]:
    """The study's patient and order identity columns as this data set gives them."""
    enc, idx = cipher.encrypt, cipher.blind_index
    accession, patient = text(ds, "AccessionNumber"), text(ds, "PatientID")
    issuer = text(ds, "IssuerOfPatientID") or default_issuer.strip()
    return {
        "accession_index": idx(accession, scope="accession") if accession else None,
        "accession_enc": enc(accession or None, column="study.accession"),
        "dicom_patient_index": idx(f"{issuer}|{patient}", scope="mrn") if patient else None,
        "patient_id_enc": enc(patient or None, column="study.patient_id"),
        "patient_name_enc": enc(text(ds, "PatientName") or None, column="study.patient_name"),
        "patient_birth_date_enc": enc(text(ds, "PatientBirthDate") or None, column="study.birth_date"),
        "patient_sex_enc": enc(text(ds, "PatientSex") or None, column="study.sex"),
    }


def new_series(ds: Dataset, cipher: FieldCipher, *, uid_index: str, study_id: int) -> Series:
    enc = cipher.encrypt
    return Series(
        study_id=study_id, series_uid_index=uid_index,
        series_uid_enc=enc(text(ds, "SeriesInstanceUID"), column="series.series_uid"),
        modality=text(ds, "Modality")[:16],
        series_number=_int(text(ds, "SeriesNumber"), column="series_number", study_id=study_id),
        description_enc=enc(text(ds, "SeriesDescription") or None, column="series.description"),
        protocol_enc=enc(text(ds, "ProtocolName") or None, column="series.protocol"),
        sequence_name=text(ds, "SequenceName")[:64], image_type=text(ds, "ImageType")[:128],
        scanning_sequence=text(ds, "ScanningSequence")[:64], inversion_time=_float(ds.get("InversionTime")),
        body_part=text(ds, "BodyPartExamined")[:64],
    )


def _restores(item: PreparedInstance, bodiless: dict[str, str | None]) -> bool:
    """Identical bytes for a current version whose body retention purged: stored as a new version, not
    a duplicate. As a duplicate, a re-send after purge was acknowledged and dropped: nothing stored,
    nothing audited, no run, the instance still bodiless. A journal replay of that very delivery (the
    same association) stays a duplicate."""
    return item.sop_index in bodiless and (not item.assoc_id or bodiless[item.sop_index] != item.assoc_id)


_BLOB = insert(Blob.__table__)  # type: ignore[arg-type]
_INSTANCE = insert(Instance.__table__).returning(Instance.__table__.c.id,  # type: ignore[arg-type, attr-defined]
                                                 sort_by_parameter_order=True)


def _blob_row(blob: Blob | BlobRecord) -> dict[str, Any]:
    return {"id": blob.id, "kind": blob.kind, "backend": blob.backend, "kek_id": blob.kek_id,
            "wrapped_dek": blob.wrapped_dek, "size": blob.size, "stored_size": blob.stored_size,
            "created_at": blob.created_at or utcnow()}


def _int(value: str | None, *, column: str, **ids: int) -> int | None:
    """An IS value for an INTEGER column: None when absent, unreadable or outside :data:`INTEGER_RANGE`.

    IS text may carry more digits than the column holds (a timestamp used as a number, ``3000000000``):
    PostgreSQL refused the row (DataError), SQLite a 20-digit one, and the acknowledged instance could
    never be indexed. The warning names the column and the internal ids (``ids``), never the value."""
    try:
        number = int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    if number is not None and not INTEGER_RANGE[0] <= number <= INTEGER_RANGE[1]:
        log.warning("number outside the INTEGER range stored as NULL",
                    extra={"reason": f"{column} out of range", **ids})
        return None
    return number


def _float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
