"""The key service role (``msgate serve --role keys``, trusted side): EHR from storage -> CKKS packs.

In HE mode this is the only place where a job's EHR values are read: the worker sends job ids (and
the fingerprint of its model), the key service resolves each job's study, patient and order, records
one ``decrypt.he_encrypt`` audit event per job *before* reading, builds the snapshot at the study date
with the same rules as the plaintext case loader (:mod:`msgate.workers.ehr`), standardises it with the
checkpoint's scaler and encrypts and MACs it (:meth:`msgate.model.he_keys.HeKeys.encrypt`). Results
come back through :func:`msgate.model.he_rpc.handle` (``finalize``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msgate.errors import MsgateError, Rejected, Transient
from msgate.model.he_keys import EncryptedPack, EncryptedResult, HeKeys

if TYPE_CHECKING:
    from msgate.storage.store import Store

log = logging.getLogger(__name__)
AUDIT_KIND = "decrypt.he_encrypt"


@dataclass(frozen=True)
class ModelSpec:
    """What the key service must share with the worker's model: the EHR scaler, the members' widths, the
    calibration temperatures and the checkpoint they come from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    widths: tuple[int, ...]
    t_edss: float = 1.0  # the checkpoint's calibration temperatures: the key service applies its own,
    t_ms: float = 1.0  # never a worker's (a tiny temperature would sharpen what a decryption reveals)
    checkpoint: str = ""  # SHA-256 of the checkpoint's metadata (model_spec); "" for a spec built by hand

    @property
    def fingerprint(self) -> str:
        """Identifies the model a worker and a key service must agree on. It covered only the scaler and
        widths, so after an upgrade that changed the temperatures a key service that kept the old
        checkpoint calibrated with the old ones, silently; now any difference is refused by name."""
        doc = json.dumps({"mean": self.mean, "std": self.std, "widths": self.widths, "t_edss": self.t_edss,
                          "t_ms": self.t_ms, "checkpoint": self.checkpoint})
        return hashlib.sha256(doc.encode()).hexdigest()[:32]

    def transform(self, x: np.ndarray, m: np.ndarray) -> np.ndarray:
        from msgate.model.patient.ehr import EhrScaler

        return EhrScaler(np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)).transform(x, m)


def model_spec(ckpt: Any) -> ModelSpec:
    """The spec of a loaded ``PatientCheckpoint`` (every member's EHR hidden width, in order)."""
    meta = hashlib.sha256(json.dumps(getattr(ckpt, "meta", {}), sort_keys=True, default=str).encode()).hexdigest()
    return ModelSpec(tuple(float(v) for v in ckpt.scaler.mean), tuple(float(v) for v in ckpt.scaler.std),
                     tuple(int(n.ehr.net[0].out_features) for n in ckpt.nets), float(ckpt.t_edss), float(ckpt.t_ms),
                     meta[:32])


def _resolve(store: Store, job_ids: list[str], *, actor: str, key_id: str | None,
             issued: dict[str, int] | None = None,
             attempts: Mapping[str, int] | None = None) -> list[tuple[int, Any]]:
    """(study id, EHR link) per job; one audit event per job, committed before anything is read. With
    ``issued`` (job id -> the attempt its inputs were last encrypted for): only a running job, once per
    attempt, so a worker cannot have the same patient's inputs encrypted again and again. ``attempts``
    (job id -> the attempt the request was made for; absent from an older worker's requests): a request
    for another attempt than the job's current one is refused ``he_stale``, before anything is recorded,
    so a request left in the queue from an earlier attempt cannot use up the current attempt's one
    encryption (and make the request its worker waits on a ``he_replay``)."""
    from msgate.storage import audit
    from msgate.storage.models import Job, Study
    from msgate.workers import ehr as ehr_mod

    out = []
    with store.db.session() as session:
        for jid in job_ids:
            job = session.get(Job, jid)
            study = session.get(Study, job.study_id) if job is not None else None
            if study is None or study.id is None:
                raise Rejected(f"no job {jid} (or its study) for HE encryption", code="he_no_job")
            if issued is not None:
                assert job is not None
                wanted = attempts.get(jid) if attempts is not None else None
                if wanted is not None and wanted != job.attempts:
                    raise Rejected(f"job {jid}: the request was made for attempt {wanted}, the job is on "
                                   f"attempt {job.attempts}: stale, no HE inputs", code="he_stale")
                if job.state != "running":
                    raise Rejected(f"job {jid} is {job.state}, not running: no HE inputs", code="he_job_state")
                if issued.get(jid) == job.attempts:
                    raise Rejected(f"job {jid} already had its HE inputs for this attempt", code="he_replay")
            link = ehr_mod.link(session, study, store.cipher)
            audit.append(session, kind=AUDIT_KIND, actor=actor[:64], subject=f"job:{jid}",
                         detail={"ehr": True, "patient_id": link.patient_id, "key_id": key_id})
            out.append((study.id, link, job.attempts if job is not None else 0))
    if issued is not None:  # after the commit: audit events a failed commit dropped do not use the attempt
        for jid, (_, _, attempt) in zip(job_ids, out, strict=True):
            issued[jid] = attempt
    return [(study_id, link) for study_id, link, _ in out]


def job_inputs(store: Store, job_ids: list[str], spec: ModelSpec, *, actor: str, key_id: str | None = None,
               issued: dict[str, int] | None = None, attempts: Mapping[str, int] | None = None) -> np.ndarray:
    """Standardised model EHR inputs of jobs, [len(job_ids), 2 * n_columns], built on the trusted side."""
    from msgate.model.patient.ehr import raw_columns
    from msgate.storage.models import Study
    from msgate.workers import ehr as ehr_mod

    rows = []
    resolved = _resolve(store, job_ids, actor=actor, key_id=key_id, issued=issued, attempts=attempts)
    with store.db.session() as session:
        for study_id, link in resolved:
            study = session.get(Study, study_id)
            if study is None:
                raise Rejected("the study was deleted", code="no_study")
            x, m = raw_columns(ehr_mod.vector(ehr_mod.snapshot(session, store.cipher, study, link, store.settings.site_zone)))
            rows.append(spec.transform(x, m))
    return np.stack(rows).astype(np.float64)


def _actor() -> str:
    return f"keys@{socket.gethostname()}:{os.getpid()}"


KEPT_SPECS = 4
"""Specs of checkpoints this key service loaded before the installed one: workers not restarted yet
after an upgrade finish their jobs with the model (and calibration) they have."""
KEPT_REQUESTS = 1 << 16
"""Request ids remembered with the spec they were encrypted under (``finalize`` calibrates with it)."""


def _checkpoint_stamp(path: Path) -> tuple[object, ...]:
    """Path, inode, times and size of the checkpoint and its JSON sidecar (as the workers' version stamp)."""
    out: list[object] = []
    for p in (path, path.with_suffix(".json")):
        try:
            st = p.stat()
            out.append((str(p), st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
        except OSError:
            out.append((str(p), -1))
    return tuple(out)


@dataclass
class JobSource:
    """The store and the model spec behind ``encrypt_jobs``: read from the checkpoint, and read again
    whenever its files change (the keys role loaded it once and kept it, so after a model upgrade HE
    results used the old calibration, or every job failed). A spec passed in (tests) is kept."""

    store: Store
    checkpoint: Path | None = None
    actor: str = field(default_factory=_actor)
    _spec: ModelSpec | None = None
    issued: dict[str, int] = field(default_factory=dict)  # job id -> attempt its inputs were encrypted for
    _stamp: tuple[object, ...] | None = None
    _older: OrderedDict[str, ModelSpec] = field(default_factory=OrderedDict)  # fingerprint -> spec
    _by_request: OrderedDict[str, ModelSpec] = field(default_factory=OrderedDict)  # request id -> its spec
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._pinned = self._spec is not None

    def _path(self) -> Path:
        from msgate.model.patient import checkpoint

        return Path(self.checkpoint) if self.checkpoint is not None else checkpoint.DEFAULT_PATH

    def spec(self) -> ModelSpec:
        """The spec of the checkpoint installed now (one ``stat`` per call; loaded again on a change)."""
        from msgate.model.patient import checkpoint

        with self._lock:
            if self._pinned and self._spec is not None:
                return self._spec
            path = self._path()
            stamp = _checkpoint_stamp(path)
            if self._spec is None or stamp != self._stamp:
                try:
                    new = model_spec(checkpoint.load(path))
                except Exception as exc:  # half copied, or missing for a moment: the jobs are retried
                    log.warning("patient checkpoint cannot be loaded", extra={"role": "keys",
                                                                               "error_type": type(exc).__name__})
                    raise Transient(f"the key service cannot load the patient checkpoint ({type(exc).__name__})",
                                    code="he_checkpoint") from None
                if self._spec is not None and self._spec.fingerprint != new.fingerprint:
                    self._older[self._spec.fingerprint] = self._spec
                    while len(self._older) > KEPT_SPECS:
                        self._older.popitem(last=False)
                    log.info("patient checkpoint changed; key service uses the new one",
                             extra={"role": "keys", "version": new.fingerprint[:12]})
                self._spec, self._stamp = new, stamp
            return self._spec

    def spec_of(self, fingerprint: str) -> ModelSpec:
        """The spec a worker's fingerprint names: the installed checkpoint's, or one loaded before it."""
        spec = self.spec()
        if fingerprint == spec.fingerprint:
            return spec
        with self._lock:
            older = self._older.get(fingerprint)
        if older is None:
            raise Rejected(f"the worker's patient model (fingerprint {fingerprint[:12]}) differs from the key "
                           f"service's ({spec.fingerprint[:12]}: scaler, ensemble, calibration temperatures or "
                           "checkpoint); deploy the same checkpoint to both and restart the workers",
                           code="he_model_mismatch")
        return older

    def spec_for_request(self, request_id: str) -> ModelSpec | None:
        """The spec a request was encrypted under (its temperatures calibrate the result, also when the
        checkpoint changed in between); None when this key service did not issue it (it restarted since)."""
        if self._pinned and self._spec is not None:
            return self._spec
        with self._lock:
            return self._by_request.get(request_id)

    def encrypt(self, keys: HeKeys, job_ids: list[str], *, model: str, max_batch: int | None = None,
                attempts: Mapping[str, int] | None = None) -> list[EncryptedPack]:
        spec = self.spec_of(model)
        key_id = keys.active_for_request()  # read once: the audit names the key the packs are encrypted under,
        # even when `keys he rotate` changes the active key between the two calls (retire counts jobs by it)
        u = job_inputs(self.store, job_ids, spec, actor=self.actor, key_id=key_id, issued=self.issued,
                       attempts=attempts)
        packs = keys.encrypt(u, job_ids, widths=spec.widths, max_batch=max_batch, key_id=key_id)
        with self._lock:
            for p in packs:
                self._by_request[p.request_id] = spec
            while len(self._by_request) > KEPT_REQUESTS:
                self._by_request.popitem(last=False)
        log.info("HE inputs encrypted", extra={"count": len(job_ids), "batch": len(packs)})
        return packs


@dataclass
class LocalKeyService:
    """The key-service calls in process (tests, the benchmark): ``inputs`` stands in for storage and
    maps case ids to standardised EHR inputs on the trusted side."""

    keys: HeKeys
    spec: ModelSpec
    inputs: Callable[[list[str]], np.ndarray]

    def encrypt_jobs(self, job_ids: list[str], *, model: str, max_batch: int | None = None) -> list[EncryptedPack]:
        if model != self.spec.fingerprint:
            raise Rejected("model fingerprint differs", code="he_model_mismatch")
        return self.keys.encrypt(self.inputs(job_ids), job_ids, widths=self.spec.widths, max_batch=max_batch)

    def finalize(self, res: EncryptedResult, *, t_edss: float = 1.0, t_ms: float = 1.0) -> list[dict[str, Any]]:
        return self.keys.finalize(res, t_edss=t_edss, t_ms=t_ms)


def run(store: Store, stop: threading.Event) -> None:
    """Role ``keys``: keep an active CKKS key for ``settings.he`` (rotating on a parameter change) and
    answer ``encrypt_jobs`` / ``finalize`` on the broker queue ``msgate.he-keys`` while HE is enabled."""
    from msgate.model.he_rpc import serve

    settings = store.settings
    he_settings = getattr(settings, "he", None)
    if he_settings is None or not he_settings.enabled:
        log.info("HE disabled; keys role idle", extra={"role": "keys"})
        stop.wait()
        return
    keys = HeKeys(settings.home, store.ring)
    key_id = keys.ensure(he_settings.params())
    try:  # before "ready": a secret it cannot open failed every job later, as a "model error"
        keys.open_secret(key_id)
    except MsgateError as exc:  # msgate's own message (a path, a key id, the chmod to run): no PHI
        log.error("CKKS secret key cannot be opened; the keys role stops",
                  extra={"role": "keys", "code": exc.code, "reason": str(exc)})
        raise
    log.info("CKKS key service ready", extra={"role": "keys", "key_id": key_id})
    if not stop.is_set():
        serve(keys, settings, stop, jobs=JobSource(store))
