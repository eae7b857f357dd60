"""Render one job's result as SR + SEG + Parametric Map + key images and ORU^R01, and queue them.

``publish_job(store, job_id)`` is what the ``msgate.publish`` task runs. It is idempotent: a job that
already has outbox entries is not rendered again (a redelivered task is harmless). A job that was
superseded or cancelled before it was published is skipped; its successor publishes. A job that
supersedes an earlier published one renders a new SR whose Predecessor Documents Sequence names the
earlier SR, and an ORU for the same order numbers with a correction note (OBR-25/OBX-11 stay ``P``:
the result is still unverified AI output).

Objects go into the original study, one new series each (SR 9800, SEG 9801, PM 9802, SC 9803), dated
(Series Date and Time) when rendered; UIDs are generated once here and stored in the encrypted blobs, so
every resend reuses them. A correction's series (a job whose predecessor's DICOM objects may have
reached a PACS) say in their Series Description which result they replace, by its series date and time
(:func:`replaced_at`), e.g. "MS lesions (AI, unverified, replaces 2026-12-07 14:03)"; the superseded ones
stay in the PACS as they were. A PACS with ``iocm_rejection`` also gets an IOCM rejection note for the
superseded SEG, map and key images it may hold (:mod:`msgate.results.rejection`).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

import highdicom as hd
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import or_
from sqlmodel import Session, col, select

from msgate.errors import Rejected
from msgate.model.types import ModelResult
from msgate.results import heatmap, hl7_out, rejection, source_headers
from msgate.results import seg as seg_mod
from msgate.results import sr as sr_mod
from msgate.results.identity import Identity
from msgate.results.outbox import OPEN_STATES, Rendered, enqueue, retire
from msgate.results.sources import FlairSources, load_sources
from msgate.storage import audit
from msgate.storage.models import Blob, Job, OutboxEntry, Study, utcnow
from msgate.storage.store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")
PUBLISHABLE = ("done",)


@dataclass(frozen=True)
class RenderOptions:
    key_images: int = 3  # 0 turns the Secondary Capture key images off
    parametric_map: bool = True
    seg: bool = True  # off: no SEG; each lesion's SR group points at its centroid instead of a segment

    @classmethod
    def from_settings(cls, settings: object) -> RenderOptions:
        section = getattr(settings, "results", None)
        if section is None:
            return cls()
        return cls(key_images=int(getattr(section, "key_images", cls.key_images)),
                   parametric_map=bool(getattr(section, "parametric_map", cls.parametric_map)),
                   seg=bool(getattr(section, "seg", cls.seg)))


@dataclass
class RenderedJob:
    objects: list[Rendered] = field(default_factory=list)
    sr_uid: str = ""
    correction: bool = False


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def render(result: ModelResult, sources: FlairSources | list[Dataset], *, options: RenderOptions = RenderOptions(),
           previous: list[Dataset] | None = None, replaces: str | None = None,
           rendered_at: datetime | None = None) -> tuple[list[Rendered], str]:
    """The DICOM objects of one result (SEG first) on its source planes (a list: sorted single-frame
    images, one per slice); returns them and the SR SOP Instance UID. ``replaces``: the series date and
    time of the result this one corrects at the PACS (:func:`replaced_at`), named in every Series
    Description; ``rendered_at``: their Series Date and Time (publish: now in ``site_timezone``, the
    zone of the site's DICOM dates; default: the host's local time)."""
    sources = FlairSources.of(sources)
    for source in sources.datasets:
        source_headers.normalise(source)
    ident = Identity.of(result)
    now = rendered_at or datetime.now()
    seg = _optional("SEG", lambda: seg_mod.build_seg(result, sources, ident, series_uid=hd.UID(),
                                                      sop_uid=hd.UID(), replaces=replaces)) if options.seg else None
    sr_uid = hd.UID()
    report = sr_mod.build_sr(result, sources, seg, ident, series_uid=hd.UID(), sop_uid=sr_uid, previous=previous or ())
    if replaces is not None:  # build_sr's "MS AI report (unverified)", naming what it replaces
        report.SeriesDescription = f"MS AI report (unverified, replaces {replaces})"
    objects = []
    if seg is not None:
        objects.append(Rendered("out.seg", _encode(_dated(seg.dataset, now))))
    if options.parametric_map:
        pm = _optional("parametric map", lambda: heatmap.build_pm(result, sources, ident, series_uid=hd.UID(),
                                                                   sop_uid=hd.UID(), replaces=replaces))
        if pm is not None:
            objects.append(Rendered("out.pm", _encode(_dated(pm, now))))
    if options.key_images > 0:
        series = hd.UID()
        images = _optional("key images", lambda: heatmap.build_key_images(
            result, sources, ident, series_uid=series, sop_uids=[hd.UID() for _ in range(options.key_images)],
            replaces=replaces))
        for sc in images or []:
            objects.append(Rendered("out.sc", _encode(_dated(sc, now))))
    objects.append(Rendered("out.sr", _encode(_dated(report, now))))
    return objects, sr_uid


def _dated(ds: Dataset, when: datetime) -> Dataset:
    """Series Date and Time: when this result was rendered, the same for all its series (a correction
    names them)."""
    ds.SeriesDate, ds.SeriesTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    return ds


def when_rendered(ds: Dataset) -> str:
    """A result object's series date and time as a correction names it (``YYYY-MM-DD HH:MM``, 16
    characters: each Series Description stays within LO's 64); an object from before series were dated
    gives its Instance Creation date and time; "earlier result" when it has neither."""
    for date_tag, time_tag in (("SeriesDate", "SeriesTime"), ("InstanceCreationDate", "InstanceCreationTime")):
        date, time = str(ds.get(date_tag) or ""), str(ds.get(time_tag) or "")
        if len(date) == 8 and date.isdigit() and len(time) >= 4 and time[:4].isdigit():
            return f"{date[:4]}-{date[4:6]}-{date[6:8]} {time[:2]}:{time[2:4]}"
    return "earlier result"


def _optional(what: str, build: Callable[[], T]) -> T | None:
    """A derived image object (SEG, map, key images) that cannot be built on these sources is left out,
    logged: the SR and the ORU, which carry the findings, still go out. The grid check stays fatal."""
    try:
        return build()
    except ValueError as exc:
        if str(exc).startswith('Argument "result"'):  # the result is not on the FLAIR grid: nothing is right
            raise
        log.warning("result object left out: it cannot be built on the source images",
                    extra={"reason": what, "error_type": type(exc).__name__})
        return None


def _reached() -> object:
    """An entry that may have reached its destination: delivered, being sent, or tried at least once (an
    ACK that timed out, a C-STORE without answer: the peer may have filed it). One never tried is dropped
    by this publish and never reaches anyone."""
    return or_(col(OutboxEntry.state).in_(("delivered", "sending")), col(OutboxEntry.attempts) > 0)


def previous_sent(store: Store, job: Job, kind: str) -> bytes | None:
    """The ``kind`` object (``out.sr``, ``out.oru``) of the nearest superseded job that may have reached
    its destination (:func:`_reached`; walks ``supersedes_id``). One never tried is dropped by this
    publish and never reaches anyone: naming it as the predecessor would point the PACS or the EHR at
    nothing."""
    found = previous_sent_by(store, job, kind)
    return found[1] if found is not None else None


def previous_sent_by(store: Store, job: Job, kind: str) -> tuple[str, bytes] | None:
    """:func:`previous_sent` with the id of the job that sent it (whose flags say whom its ORU named)."""
    with store.db.session() as session:
        for earlier in predecessors(session, job):
            for blob_id in session.exec(
                select(OutboxEntry.blob_id).join(Blob, col(Blob.id) == col(OutboxEntry.blob_id))
                .where(OutboxEntry.job_id == earlier, Blob.kind == kind, _reached())
            ).all():
                data = store.blobs.read(session, blob_id)
                if hl7_out.WRONG_SUBJECT.encode() not in data:  # a withdrawal sent to another patient: not it
                    return earlier, data
    return None


def replaced_at(store: Store, job: Job) -> str | None:
    """What a correction's Series Descriptions name (:func:`when_rendered`): the nearest superseded job
    whose DICOM objects may have reached a PACS (:func:`_reached`); None when none did (for the PACS
    this is a first result). Read from that job's SR, else from one of its image objects."""
    with store.db.session() as session:
        for earlier in predecessors(session, job):
            rows = session.exec(
                select(Blob.kind, OutboxEntry.blob_id).join(Blob, col(Blob.id) == col(OutboxEntry.blob_id))
                .where(OutboxEntry.job_id == earlier, OutboxEntry.kind == "dicom", _reached())
            ).all()
            ranked = sorted((kind != "out.sr", blob_id) for kind, blob_id in rows if kind != rejection.KIND)
            if ranked:
                raw = store.blobs.read(session, ranked[0][1])
                return when_rendered(dcmread(io.BytesIO(raw), stop_before_pixels=True))
    return None


def _rejected_at(store: Store, session: Session, earlier: Sequence[str], destination: str) -> list[Dataset]:
    """Headers of the superseded SEG, map and key images that may have reached ``destination``
    (:func:`_reached`), nearest job first; the walk stops after a job whose own rejection note was
    delivered there (what it superseded is rejected there already)."""
    out: list[Dataset] = []
    for job_id in earlier:
        rows = session.exec(
            select(Blob.kind, OutboxEntry.blob_id, OutboxEntry.state)
            .join(Blob, col(Blob.id) == col(OutboxEntry.blob_id))
            .where(OutboxEntry.job_id == job_id, OutboxEntry.destination == destination, _reached())
            .order_by(col(OutboxEntry.created_at), col(OutboxEntry.id))
        ).all()
        for kind, blob_id, _state in rows:
            if kind in rejection.REJECTED:
                out.append(dcmread(io.BytesIO(store.blobs.read(session, blob_id)), stop_before_pixels=True))
        if any(kind == rejection.KIND and state == "delivered" for kind, _blob, state in rows):
            break
    return out


def _reject_superseded(store: Store, session: Session, job_id: str, earlier: Sequence[str],
                       source: Dataset) -> int:
    """Queue an IOCM rejection note for each PACS with ``iocm_rejection`` that may hold superseded image
    objects (:mod:`msgate.results.rejection`); returns how many. A note that cannot be built is left
    out, logged: the correction itself still goes out."""
    count = 0
    for dest in store.settings.pacs:
        if not dest.iocm_rejection:
            continue
        rejected = _rejected_at(store, session, earlier, dest.name)
        if not rejected:
            continue
        try:
            note = rejection.build_note(rejected, source, series_uid=hd.UID(), sop_uid=hd.UID())
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("rejection note left out: it cannot be built for these objects",
                        extra={"job_id": job_id, "destination": dest.name, "error_type": type(exc).__name__})
            continue
        rejection.enqueue_note(store, session, job_id=job_id, destination=dest.name, data=_encode(note),
                               count=len(rejected))
        count += 1
    return count


def previous_sr(store: Store, job: Job) -> Dataset | None:
    """The SR header the new SR supersedes (:func:`previous_sent`)."""
    raw = previous_sent(store, job, "out.sr")
    return dcmread(io.BytesIO(raw), stop_before_pixels=True) if raw is not None else None


def predecessors(session: Session, job: Job) -> list[str]:
    """The earlier jobs this one supersedes (walking ``supersedes_id``), nearest first."""
    out, seen, current = [], {job.id}, job.supersedes_id
    while current and current not in seen:
        seen.add(current)
        out.append(current)
        older = session.get(Job, current)
        current = older.supersedes_id if older is not None else None
    return out


def _oru(store: Store, session: Session, job: Job, study: Study, result: ModelResult, sources: FlairSources,
         sr_uid: str, correction: bool, previous: bytes | None) -> bytes | None:
    """The ORU (a correction of an earlier result that reached a destination; ``previous``: the ORU the
    EHR got for it, whose observations this one no longer has are retracted), or None when it cannot be built (recorded on the job and audited): the DICOM objects still go to the
    PACS, instead of the whole publish failing for good on one HL7 field."""
    try:
        numbers = hl7_out.order_numbers(session, store.cipher, study=study, source=sources.first,
                                        order_id=job.flags.get("order_id"))
        oru = hl7_out.render_oru(result, source=sources.first, numbers=numbers, sr_uid=sr_uid,
                                 correction=correction, settings=store.settings,
                                 previous_oru=previous.decode("utf-8", "replace") if previous else None).encode("utf-8")
        job.flags = {**job.flags, "oru_subject": numbers.subject.as_flags()}  # whom it named (hl7_out.moved)
        return oru
    except Rejected as exc:
        log.error("ORU left out: it cannot be built for this result", extra={"job_id": job.id, "reason": exc.code})
        job.flags = {**job.flags, "oru_error": exc.code}
        audit.append(session, kind="results.oru_refused", actor="publish", subject=f"job:{job.id}",
                     detail={"reason": exc.code})
        return None


def _named(session: Session, job_id: str) -> hl7_out.Subject:
    """Whom the ORU of an earlier job named (:func:`hl7_out.job_subject`); unknown for a job row gone."""
    earlier = session.get(Job, job_id)
    return hl7_out.job_subject(session, earlier.flags or {}) if earlier is not None else hl7_out.Subject()


def _retire_predecessors(session: Session, job_ids: list[str]) -> int:
    """Undelivered objects of superseded jobs are dropped: sent after the correction (their retry was
    due later), they would leave the EHR and the PACS holding the out-of-date result.

    One being sent (``sending``) keeps its lease, so the peer's answer is still recorded; the sender
    then drops it instead of retrying (:func:`msgate.results.outbox.record`, ``renew``, ``claim``). It
    used to survive here and go back to pending on an ACK timeout, to be resent after the correction.
    The row locks order this against a sender recording that entry's answer."""
    entries = session.exec(select(OutboxEntry).where(col(OutboxEntry.job_id).in_(job_ids),
                                                     col(OutboxEntry.state).in_(OPEN_STATES))
                           .order_by(col(OutboxEntry.id)).with_for_update()).all()
    waiting = [entry for entry in entries if entry.state != "sending"]
    for entry in waiting:
        retire(session, entry, actor="publish")
    return len(waiting)


def publish_job(store: Store, job_id: str) -> str:
    """Render and enqueue; returns ``queued``, ``already`` or ``skipped:<state>``."""
    from msgate.workers.results_io import read_result

    with store.db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise Rejected("no such job", code="no_job")
        if session.exec(select(OutboxEntry.id).where(OutboxEntry.job_id == job_id)).first() is not None:
            return "already"
        if job.state not in PUBLISHABLE:
            return f"skipped:{job.state}"
    result = read_result(store, job_id)
    if result is None:
        raise Rejected("the job has no stored result", code="no_result")
    sources = load_sources(store, job)
    previous = previous_sr(store, job)
    sent_oru = previous_sent_by(store, job, "out.oru")
    previous_oru = sent_oru[1] if sent_oru is not None else None
    objects, sr_uid = render(result, sources, options=RenderOptions.from_settings(store.settings),
                             previous=[previous] if previous is not None else None,
                             replaces=replaced_at(store, job), rendered_at=datetime.now(store.settings.site_zone))
    with store.db.session() as session:
        # the job row's lock orders concurrent runs of this job (a redelivered or re-handed-off task) and a
        # successor superseding it while it rendered: the checks below then see what the other committed
        locked = session.exec(select(Job).where(Job.id == job_id).with_for_update()).first()
        if locked is None:
            raise Rejected("no such job", code="no_job")
        if locked.state not in PUBLISHABLE:
            return f"skipped:{locked.state}"  # superseded or cancelled while it rendered: its successor publishes
        study = session.get(Study, job.study_id)
        assert study is not None
        earlier = predecessors(session, job)
        published = bool(earlier) and session.exec(select(OutboxEntry.id).where(  # by any destination
            col(OutboxEntry.job_id).in_(earlier), _reached())).first() is not None
        if store.settings.hl7_out is not None:
            oru = _oru(store, session, locked, study, result, sources, sr_uid, published,
                       previous_oru if published else None)
            if oru is not None and published and sent_oru is not None and hl7_out.moved(
                    sent_oru[1].decode("utf-8", "replace"), oru.decode("utf-8", "replace"),
                    _named(session, sent_oru[0]), hl7_out.job_subject(session, locked.flags)):
                # the study was re-identified after its result went out: the earlier patient's (or order's)
                # result is withdrawn, and this one is a first result for its own patient, not a correction
                objects.append(Rendered("out.oru", hl7_out.wrong_patient_retraction(
                    previous_oru.decode("utf-8", "replace"), utcnow().strftime("%Y%m%d%H%M%S")).encode("utf-8")))
                oru = _oru(store, session, locked, study, result, sources, sr_uid, False, None)
                audit.append(session, kind="results.withdrawn", actor="publish", subject=f"job:{job_id}",
                             detail={"reason": "wrong_subject", "predecessors": len(earlier)})
            if oru is not None:
                objects.append(Rendered("out.oru", oru))
        if session.exec(select(OutboxEntry.id).where(OutboxEntry.job_id == job_id)).first() is not None:
            return "already"  # a concurrent run won
        queued = enqueue(store, session, job_id=job_id, objects=objects)
        notes = 0
        if queued and earlier:
            _retire_predecessors(session, earlier)
            notes = _reject_superseded(store, session, job_id, earlier, sources.first)
        if queued:
            study.delivered_at = None  # new results are pending for this study
            session.add(study)
        # rendered (even with no destination configured): the reconciler's stalled-publish sweep skips it
        locked.flags = {**locked.flags, "rendered_at": utcnow().isoformat()}
        session.add(locked)
        audit.append(session, kind="results.rendered", actor="publish", subject=f"job:{job_id}",
                     detail={"objects": [o.kind for o in objects], "entries": len(queued),
                             "correction": published, "model_version": result.model_version,
                             "rejection_notes": notes})
    log.info("results queued", extra={"job_id": job_id, "count": len(queued) + notes})
    return "queued"
