"""The scheduler role: ready studies -> jobs, and the reconciler of the task outbox.

Every ``scan_seconds`` (and at once when the listener's readiness hook fires, :func:`hook`) it looks
at the studies that became ready recently, and at ready studies whose patient's EHR changed, and
*plans* each one (:func:`plan`): the series per role, the linked order/patient, the EHR snapshot
at the study date and the idempotency key

    sha256(study UID index | series-set hash | EHR snapshot hash | model version).

A key equal to the study's newest job's does nothing (a study or message sent again runs once), and
the study is not planned again until it is ready again (``Job.planned_ready_at``). Any other key creates
a job that supersedes the study's earlier ones (a changed series set or a corrected value: the new result
goes out as a correction), also a key an older, superseded job had: a correction that was itself corrected
(an A08 reverted, a lab value withdrawn, the original series re-sent) runs the case again. While a
required EHR field (``workers.required_ehr_fields``) is missing the case waits, up to
``ehr_deadline_seconds`` after the study became ready; then it runs with the missing fields masked and
flagged (``ehr_deadline``, ``ehr_missing:<name>``).

Transactional outbox for tasks: the job row is committed first, then the task is sent and
``published_at`` set. The reconciler re-sends committed jobs that never reached the broker, returns
jobs of lost workers (expired lease) to the queue, and re-sends lost hand-offs to ``publish``.
State lives in the database only, so a restarted scheduler picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import and_, exists, or_, update
from sqlmodel import Session, col, select

from msgate.config import Settings
from msgate.storage import audit_anchor
from msgate.storage.models import (Instance, Job, Observation, Order, Patient, PatientIdentifier, Series, Study,
                                   utcnow)
from msgate.storage.store import Store
from msgate.workers import case as case_mod
from msgate.workers import ehr as ehr_mod
from msgate.workers import jobs, runtime, tasks

log = logging.getLogger(__name__)

# How far each scan looks back past the previous one for EHR changes. A row's ``updated_at`` is set
# when it is written, not when its transaction commits: an HL7 batch committed seconds later would
# otherwise fall behind the watermark unseen. Seeing a change twice costs a plan; its key dedups.
WATERMARK_OVERLAP = timedelta(seconds=60)

_wakeups: queue.SimpleQueue[int] = queue.SimpleQueue()


def hook(ready: Any) -> None:
    """Readiness hook for the listener's ``Tracker.add_hook``: wake the scheduler for this study."""
    _wakeups.put(int(ready.study_id))


@dataclass(frozen=True)
class Plan:
    study_id: int
    idem_key: str
    series: dict[str, int]
    missing: list[str]
    required_missing: list[str]
    wait_until: datetime | None
    flags: dict[str, Any] = field(default_factory=dict)
    ready_at: datetime | None = None  # the Study.ready_at this plan was made for


def series_hash(session: Session, chosen: dict[str, Series]) -> str:
    """The series part of the idempotency key: each role's series and the identity of its current instances.
    An instance's identity is its content hash, except for a new version decided to be only another encoding
    of the one it replaced (a study re-sent compressed): that keeps the earlier identity, so no second run
    (``Instance.change_hash``, decided by :mod:`msgate.storage.reencoded`; NULL: not decided, the content
    hash counts)."""
    digest = hashlib.sha256()
    for role in sorted(chosen):
        series = chosen[role]
        hashes = sorted(change or content for content, change in session.exec(
            select(Instance.content_hash, Instance.change_hash).where(
                Instance.series_id == series.id, col(Instance.current).is_(True))).all())
        digest.update(f"{role}|{series.series_uid_index}|{len(hashes)}|".encode())
        for h in hashes:
            digest.update(h.encode())
    return digest.hexdigest()


def idem_key(study_uid_index: str, series_digest: str, ehr_digest: str, model_version: str) -> str:
    return hashlib.sha256(f"{study_uid_index}|{series_digest}|{ehr_digest}|{model_version}".encode()).hexdigest()


def plan(session: Session, store: Store, study: Study, *, model_version: str) -> Plan | None:
    """What job this ready study needs now; None when it has no FLAIR series."""
    chosen = case_mod.choose_series(list(session.exec(select(Series).where(Series.study_id == study.id)).all()))
    if "FLAIR" not in chosen or study.id is None:
        return None
    link = ehr_mod.link(session, study, store.cipher)
    snap = ehr_mod.snapshot(session, store.cipher, study, link, store.settings.site_zone)
    missing = ehr_mod.missing(snap)
    required = [name for name in store.settings.workers.required_ehr_fields if name in missing]
    ready_at = study.ready_at or utcnow()
    deadline = ready_at + timedelta(seconds=store.settings.workers.ehr_deadline_seconds)
    key = idem_key(study.study_uid_index, series_hash(session, chosen), ehr_mod.snapshot_hash(snap), model_version)
    result_flags = [f"ehr_missing:{name}" for name in missing] + (["ehr_deadline"] if required else [])
    flags = {"series": {role: s.id for role, s in chosen.items()}, "patient_id": link.patient_id,
             "order_id": link.order_id, "linked_via_order": link.via_order, "ready_ts": ready_at.timestamp(), "ehr_missing": missing,
             "required_missing": required, "result_flags": result_flags}
    return Plan(study.id, key, flags["series"], missing, required, deadline if required else None, flags,
                ready_at=study.ready_at)


class Scheduler:
    """One scan: plan what changed, create jobs, publish; then reconcile."""

    def __init__(self, store: Store, app: Celery) -> None:
        self.store, self.app = store, app
        self.settings: Settings = store.settings
        self.model_version: str | None = None
        self._stamp: tuple[object, ...] | None = None
        self.model_version = self._model_version()
        self.version_since = utcnow()  # when this scheduler began planning with its model version
        wk = self.settings.workers
        self.watermark = utcnow() - timedelta(seconds=wk.lookback_seconds)
        self.catch_up = True  # the first scan also takes ready studies that never got a job

    def _model_version(self) -> str | None:
        """The version new jobs are planned with, re-read on every scan so a replaced checkpoint (an
        upgrade) is planned with at once. Cheap: a declared version is one call; a loaded one is derived
        again only when the checkpoint files' size or mtime changed (:func:`runtime.version_stamp`)."""
        try:
            stamp = runtime.version_stamp(self.settings)
            if self.model_version is not None and stamp is not None and stamp == self._stamp:
                return self.model_version
            version = runtime.model_version(self.settings, fresh=self._stamp is not None)
        except Exception:  # e.g. no checkpoint yet: no jobs until the model can be loaded
            log.exception("model unavailable; no jobs are created until it loads")
            return self.model_version
        if self.model_version is not None and version != self.model_version:
            log.warning("model version changed; queued jobs are planned again",
                        extra={"model_version": version})
        self._stamp = stamp
        return version

    def candidates(self, session: Session, extra: set[int]) -> list[Study]:
        """Recently ready studies (re-planned when their EHR changes). The first scan after a start (or
        after the model became available) also takes every ready study with a FLAIR series and no job at
        all, however old: one that became ready while the scheduler was down or had no model still gets
        its job. (Only once: that query walks every ready study, and a study with earlier jobs is planned
        again only inside the window.)"""
        wk = self.settings.workers
        now = utcnow()
        since = now - timedelta(seconds=wk.ehr_deadline_seconds + wk.lookback_seconds)
        due = col(Study.ready_at) >= since
        if self.catch_up:
            has_flair = exists().where(col(Series.study_id) == col(Study.id), col(Series.role) == "FLAIR")
            has_job = exists().where(col(Job.study_id) == col(Study.id))
            due = or_(due, and_(has_flair, ~has_job))
        studies = {s.id: s for s in session.exec(select(Study).where(Study.state == "ready", due)).all()}
        for sid in extra:
            study = session.get(Study, sid)
            if study is not None and study.state == "ready":
                studies[sid] = study
        changed = self._ehr_changed(session)
        latest: dict[int, Job] = {}
        if studies:
            for job in session.exec(select(Job).where(col(Job.study_id).in_(list(studies)))
                                    .order_by(col(Job.created_at), col(Job.id).desc())).all():
                latest[job.study_id] = job  # the newest, as jobs.create orders them
        out = []
        for sid, study in studies.items():
            job = latest.get(sid)  # type: ignore[arg-type]
            # ready again since its newest job was created, and not yet planned at that readiness (a study
            # re-sent unchanged keeps its job; jobs.create records the plan as ``planned_ready_at``)
            fresh = job is None or (study.ready_at is not None and job.created_at < study.ready_at
                                    and (job.planned_ready_at is None or job.planned_ready_at < study.ready_at))
            if (fresh or sid in extra or study.patient_id in changed[0] or study.accession_index in changed[1]
                    or study.dicom_patient_index in changed[2]):
                out.append(study)
        self.watermark = now - WATERMARK_OVERLAP
        return out

    def _remember_patients(self, linked: list[tuple[Study, int]]) -> None:
        """Record the patient a study was linked to through its order (its DICOM identifier linked none):
        a lab value or A08 that arrived after the case ran is matched by ``Study.patient_id``, so such a
        study was never planned again with it. One short transaction per study (the tracker writes study
        rows too), and only while the study still has no patient and the identity it was planned with (a
        corrected instance re-identifying it meanwhile must not get the old patient back)."""
        for study, patient_id in linked:
            with self.store.db.session() as session:
                session.execute(update(Study).where(
                    col(Study.id) == study.id, col(Study.patient_id).is_(None),
                    col(Study.dicom_patient_index) == study.dicom_patient_index
                    if study.dicom_patient_index is not None else col(Study.dicom_patient_index).is_(None),
                    col(Study.accession_index) == study.accession_index
                    if study.accession_index is not None else col(Study.accession_index).is_(None),
                ).values(patient_id=patient_id))

    def _ehr_changed(self, session: Session) -> tuple[set[int | None], set[str | None], set[str]]:
        """Patients with new observations, orders or demographics (an ADT^A08 correction, an A40 merge)
        since the last scan; their accessions and identifiers."""
        patients: set[int | None] = set(session.exec(select(Observation.patient_id).where(
            col(Observation.updated_at) >= self.watermark)).all())
        patients |= set(session.exec(select(Patient.id).where(col(Patient.updated_at) >= self.watermark)).all())
        orders = session.exec(select(Order.patient_id, Order.accession_index).where(
            col(Order.updated_at) >= self.watermark)).all()
        patients |= {p for p, _ in orders}
        idents: set[str] = set()
        if patients - {None}:  # studies link by identifier until an HL7 message sets Study.patient_id
            idents = set(session.exec(select(PatientIdentifier.id_index).where(
                col(PatientIdentifier.patient_id).in_([p for p in patients if p is not None]))).all())
        return patients, {a for _, a in orders if a}, idents

    def scan(self, extra: set[int] | None = None) -> list[str]:
        """Create the jobs that are due; returns their ids (published or left to the reconciler)."""
        created: list[str] = []
        version = self._model_version()
        if version != self.model_version:
            self.version_since = utcnow()
        self.model_version = version
        if version is None:
            return created
        # a job still queued for another version, planned before this scheduler took its version (the
        # checkpoint was replaced, or it started with another one), is planned again: the new job supersedes
        # it, and no worker runs a job under a version it was not keyed with. A job another scheduler planned
        # since, with its own version, is left: two schedulers on two checkpoints superseded each other's
        # jobs on every scan, one new job each time
        extra = (extra or set()) | jobs.stale_version_studies(self.store.db, model_version=version,
                                                              created_before=self.version_since)
        with self.store.db.session() as session:
            studies = self.candidates(session, extra)
            plans = [p for s in studies if (p := plan(session, self.store, s, model_version=version))]
            linked = {s.id: s for s in studies if s.patient_id is None}
        self._remember_patients([(linked[p.study_id], p.flags["patient_id"]) for p in plans
                                 if p.study_id in linked and p.flags.get("linked_via_order")])
        now = utcnow()
        for p in plans:
            if p.wait_until is not None and now < p.wait_until:
                continue  # waiting for the HL7 feed
            job = jobs.create(self.store.db, study_id=p.study_id, idem_key=p.idem_key,
                              model_version=version, flags=p.flags, ready_at=p.ready_at)
            if job is not None:
                log.info("job created", extra={"job_id": job.id, "study_id": p.study_id,
                                               "count": len(p.required_missing)})
                self.publish(job.id)
                created.append(job.id)
        self.catch_up = False  # every study the catch-up found is planned (or waits inside the window)
        return created

    def publish(self, job_id: str) -> bool:
        try:
            tasks.send_infer(self.app, job_id)
        except Exception as exc:  # broker down: the reconciler sends it later
            log.warning("could not publish the job; the reconciler retries",
                        extra={"job_id": job_id, "error_type": type(exc).__name__})
            return False
        jobs.mark_published(self.store.db, job_id)
        return True

    def reconcile(self) -> dict[str, int]:
        wk = self.settings.workers
        db = self.store.db
        expired = jobs.expire_leases(db, max_attempts=wk.max_retries + 1)
        for jid in expired:
            log.warning("worker lost; job re-queued (or failed at the retry limit)", extra={"job_id": jid})
        sent = 0
        for jid in jobs.unpublished(db, older_than=wk.publish_grace_seconds, backoff_max=wk.retry_backoff_max):
            if not self.publish(jid):
                break
            sent += 1
        handed = 0
        # each hand-off is claimed on the job row before it is sent (two schedulers never both send it);
        # a send that fails after its claim is picked up again by the stalled-publish sweep
        for jid in jobs.not_handed_off(db, older_than=wk.publish_grace_seconds):
            if not jobs.claim_handoff(db, jid):
                continue
            try:
                tasks.send_publish(self.app, jid)
            except Exception:
                break
            handed += 1
        stalled_before = utcnow() - timedelta(seconds=wk.publish_stall_seconds)
        for jid in jobs.stalled_publish(db, older_than=wk.publish_stall_seconds, max_handoffs=wk.publish_handoffs):
            if not jobs.claim_handoff(db, jid, again_before=stalled_before):
                continue
            try:
                tasks.send_publish(self.app, jid)
            except Exception:
                break
            log.warning("job handed to publishing again: nothing was rendered", extra={"job_id": jid})
            handed += 1
        if sent or handed:
            log.info("reconciled", extra={"count": sent, "batch": handed})
        return {"expired": len(expired), "republished": sent, "handed_off": handed}


def _drain(timeout: float) -> set[int]:
    out: set[int] = set()
    try:
        out.add(_wakeups.get(timeout=timeout))
        while True:
            out.add(_wakeups.get_nowait())
    except queue.Empty:
        pass
    return out


def run(store: Store, stop: threading.Event) -> None:
    """The ``scheduler`` role: scan and reconcile until ``stop`` is set."""
    from msgate.storage import retention_schedule
    from msgate.workers.celery_app import build_app

    sched = Scheduler(store, build_app(store.settings))
    anchors = audit_anchor.Anchorer.for_settings(store.db, store.settings)
    period = store.settings.workers.scan_seconds
    log.info("scheduler started", extra={"model_version": sched.model_version})
    retention = retention_schedule.start(store, stop)  # storage.purge_interval_s, in a thread of its own
    next_reconcile = 0.0
    extra: set[int] = set()
    while not stop.is_set():
        try:
            sched.scan(extra)
            if time.monotonic() >= next_reconcile:
                sched.reconcile()
                next_reconcile = time.monotonic() + period
        except Exception:
            log.exception("scheduler pass failed")
        anchors.tick()
        extra = _drain(period)
    anchors.close()
    if retention is not None:
        retention.join(timeout=30)  # a running purge stops after its current study
    log.info("scheduler stopped")


def _wire_listener() -> None:
    """``serve --role all`` imports every role module before starting any, so the listener started in this
    process wakes the scheduler through :func:`hook` at once; other setups rely on the scan period."""
    try:
        from msgate.listener.server import add_ready_hook
    except ImportError:
        return
    add_ready_hook(hook)


_wire_listener()
