"""Load one job's case: decrypt in memory, decode, assemble volumes, build the EHR vector.

Nothing decrypted touches the disk: blob plaintext goes from ``store.blobs.read`` into pydicom via
``BytesIO``. Each decryption is recorded first (``decrypt.inference`` audit events, one per series
and one for the EHR snapshot; internal ids only). The model gets a pseudonymous :class:`Case`: its
``case_id`` is the job id, and no names, UIDs or accession numbers are in it.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlmodel import col, select

from msgate.errors import Rejected
from msgate.model.types import Case, EhrVector, Role, Volume
from msgate.storage import audit
from msgate.storage.models import Instance, Series, Study
from msgate.storage.store import Store
from msgate.workers import ehr as ehr_mod
from msgate.workers import volume as volume_mod

ROLES: tuple[Role, ...] = ("FLAIR", "QSM", "T1")
READ_THREADS = 4
"""Blob reads per series run on this many connections (PostgreSQL: round trips dominate; SQLite
transactions take the write lock, so one)."""


@dataclass
class Loaded:
    case: Case
    flags: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    flair_instances: list[int | None] = field(default_factory=list)
    flair_frames: list[int | None] = field(default_factory=list)  # per slice k: 0-based frame of a multi-frame


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


def _instances(store: Store, series: dict[str, int], study_id: int,
               with_ehr: bool = True) -> tuple[dict[str, list[tuple[int, str]]], ehr_mod.EhrLink | None]:
    """(instance id, blob id) of each role's current instances, and the EHR link (None without the EHR),
    in one read transaction."""
    out: dict[str, list[tuple[int, str]]] = {}
    with store.db.session() as session:
        study = session.get(Study, study_id)
        if study is None:
            raise Rejected("the study was deleted", code="no_study")
        link = ehr_mod.link(session, study, store.cipher) if with_ehr else None
        for role, series_id in series.items():
            rows = session.exec(select(Instance.id, Instance.blob_id).where(  # a series the PACS moved to another
                Instance.series_id == series_id, Instance.study_id == study_id,  # study is that study's now
                col(Instance.current).is_(True)).order_by(col(Instance.id))).all()
            if not rows:
                raise Rejected(f"series {role} has no stored instances in this study", code="empty_series")
            out[role] = [(int(iid), str(bid)) for iid, bid in rows]  # type: ignore[arg-type]
    return out, link


def _audit(store: Store, *, actor: str, job_id: str, details: list[dict[str, Any]],
           kind: str = "decrypt.inference") -> None:
    """One ``kind`` event per series and one for the EHR, in one transaction, before reading."""
    with store.db.session() as session:
        for detail in details:
            audit.append(session, kind=kind, actor=actor[:64], subject=f"job:{job_id}", detail=detail)


def _read_series(store: Store, pairs: list[tuple[int, str]]) -> list[tuple[int, bytes]]:
    threads = 1 if store.db.is_sqlite else min(READ_THREADS, len(pairs))
    if threads <= 1:
        return _read_blobs(store, pairs)
    chunks = [pairs[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="case-read") as pool:
        parts = list(pool.map(lambda chunk: _read_blobs(store, chunk), chunks))
    order = {iid: n for n, (iid, _) in enumerate(pairs)}
    return sorted((item for part in parts for item in part), key=lambda item: order[item[0]])


def _read_blobs(store: Store, pairs: list[tuple[int, str]]) -> list[tuple[int, bytes]]:
    with store.db.session() as session:
        return [(iid, store.blobs.read(session, blob_id)) for iid, blob_id in pairs]


def _parse(raw: list[tuple[int, bytes]], role: str) -> list[Dataset]:
    out = []
    for n, (_, data) in enumerate(raw, start=1):
        try:
            out.append(dcmread(io.BytesIO(data), force=True))
        except Exception as exc:  # pydicom raises many types for damaged files
            raise Rejected(f"series {role}: instance {n} is not a readable DICOM dataset ({type(exc).__name__})",
                           code="undecodable") from None
    return out


def load(store: Store, *, job_id: str, study_id: int, series: dict[str, int], actor: str,
         audit_kind: str = "decrypt.inference", with_ehr: bool = True) -> Loaded:
    """Build the Case for a job (``series``: role -> series id, chosen by the scheduler). Training
    (``workers.training``) loads cases the same way with ``audit_kind="decrypt.training"``.
    ``with_ehr=False`` (HE mode): the EHR is neither linked, read nor decrypted here (``Case.ehr`` is
    None); the key service encrypts it from storage by job id (``msgate.model.he_service``)."""
    if "FLAIR" not in series:
        raise Rejected("the case has no FLAIR series", code="no_flair")
    stages = {"load_ms": 0.0, "decode_ms": 0.0}
    volumes: dict[str, Volume] = {}
    flags: list[str] = []
    flair_instances: list[int | None] = []
    flair_frames: list[int | None] = []
    t0 = time.perf_counter()
    wanted = {role: series[role] for role in ROLES if role in series}
    instances, link = _instances(store, wanted, study_id, with_ehr)
    _audit(store, actor=actor, job_id=job_id, kind=audit_kind, details=[
        *({"series_id": sid, "role": role, "instances": len(instances[role])} for role, sid in wanted.items()),
        *([{"ehr": True, "patient_id": link.patient_id}] if link is not None else [])])
    stages["load_ms"] += _ms(t0)
    for role in ROLES:
        if role not in series:
            flags.append(f"{role.lower()}_absent")
            continue
        t0 = time.perf_counter()
        raw = _read_series(store, instances[role])
        datasets = _parse(raw, role)
        stages["load_ms"] += _ms(t0)
        t0 = time.perf_counter()
        assembly = volume_mod.assemble(datasets, role)
        stages["decode_ms"] += _ms(t0)
        volumes[role] = assembly.volume
        flags.extend(f"{role.lower()}_{flag}" for flag in assembly.flags)
        if role == "FLAIR":
            flair_instances = [None if src is None else raw[src][0] for src in assembly.sources]
            flair_frames = list(assembly.frames)
        del raw, datasets
    t0 = time.perf_counter()
    ehr = _ehr(store, study_id, link) if link is not None else None
    stages["load_ms"] += _ms(t0)
    case = Case(case_id=job_id, volumes=volumes, ehr=ehr)
    return Loaded(case, flags, {k: round(v, 1) for k, v in stages.items()}, flair_instances, flair_frames)


def _ehr(store: Store, study_id: int, link: ehr_mod.EhrLink) -> EhrVector:
    """The EHR snapshot at the study date, decrypted in memory, as the model's vector."""
    with store.db.session() as session:
        study = session.get(Study, study_id)
        if study is None:
            raise Rejected("the study was deleted", code="no_study")
        return ehr_mod.vector(ehr_mod.snapshot(session, store.cipher, study, link, store.settings.site_zone))


def choose_series(rows: list[Series]) -> dict[str, Series]:
    """Per role, the series with the most image frames (a 3D FLAIR sent as one multi-frame instance has
    as many as its slices), then the most instances, then the lowest id."""
    chosen: dict[str, Series] = {}
    for row in sorted(rows, key=lambda s: (-s.frame_count, -s.instance_count, s.id or 0)):
        if row.role in ROLES and row.role not in chosen:
            chosen[row.role] = row
    return chosen
