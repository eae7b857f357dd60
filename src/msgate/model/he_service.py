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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msgate.errors import Rejected
from msgate.model.he_keys import EncryptedPack, EncryptedResult, HeKeys

if TYPE_CHECKING:
    from msgate.storage.store import Store

log = logging.getLogger(__name__)
AUDIT_KIND = "decrypt.he_encrypt"


@dataclass(frozen=True)
class ModelSpec:
    """What the key service must share with the worker's model: the EHR scaler and the members' widths."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    widths: tuple[int, ...]
    t_edss: float = 1.0  # the checkpoint's calibration temperatures: the key service applies its own,
    t_ms: float = 1.0  # never a worker's (a tiny temperature would sharpen what a decryption reveals)

    @property
    def fingerprint(self) -> str:
        """Identifies the inputs a model expects; a worker and a key service must agree on it."""
        doc = json.dumps({"mean": self.mean, "std": self.std, "widths": self.widths})
        return hashlib.sha256(doc.encode()).hexdigest()[:32]

    def transform(self, x: np.ndarray, m: np.ndarray) -> np.ndarray:
        from msgate.model.patient.ehr import EhrScaler

        return EhrScaler(np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)).transform(x, m)


def model_spec(ckpt: Any) -> ModelSpec:
    """The spec of a loaded ``PatientCheckpoint`` (every member's EHR hidden width, in order)."""
    return ModelSpec(tuple(float(v) for v in ckpt.scaler.mean), tuple(float(v) for v in ckpt.scaler.std),
                     tuple(int(n.ehr.net[0].out_features) for n in ckpt.nets), float(ckpt.t_edss), float(ckpt.t_ms))


def _resolve(store: Store, job_ids: list[str], *, actor: str, key_id: str | None,
             issued: dict[str, int] | None = None) -> list[tuple[int, Any]]:
    """(study id, EHR link) per job; one audit event per job, committed before anything is read. With
    ``issued`` (job id -> the attempt its inputs were last encrypted for): only a running job, once per
    attempt, so a worker cannot have the same patient's inputs encrypted again and again."""
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
                if job.state != "running":
                    raise Rejected(f"job {jid} is {job.state}, not running: no HE inputs", code="he_job_state")
                if issued.get(jid) == job.attempts:
                    raise Rejected(f"job {jid} already had its HE inputs for this attempt", code="he_replay")
            link = ehr_mod.link(session, study, store.cipher)
            audit.append(session, kind=AUDIT_KIND, actor=actor[:64], subject=f"job:{jid}",
                         detail={"ehr": True, "patient_id": link.patient_id, "key_id": key_id})
            out.append((study.id, link))
        if issued is not None:
            for jid in job_ids:
                job = session.get(Job, jid)
                assert job is not None
                issued[jid] = job.attempts
    return out


def job_inputs(store: Store, job_ids: list[str], spec: ModelSpec, *, actor: str,
               key_id: str | None = None, issued: dict[str, int] | None = None) -> np.ndarray:
    """Standardised model EHR inputs of jobs, [len(job_ids), 2 * n_columns], built on the trusted side."""
    from msgate.model.patient.ehr import raw_columns
    from msgate.storage.models import Study
    from msgate.workers import ehr as ehr_mod

    rows = []
    resolved = _resolve(store, job_ids, actor=actor, key_id=key_id, issued=issued)
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


@dataclass
class JobSource:
    """The store and the model spec (from the checkpoint, loaded lazily) behind ``encrypt_jobs``."""

    store: Store
    checkpoint: Path | None = None
    actor: str = field(default_factory=_actor)
    _spec: ModelSpec | None = None
    issued: dict[str, int] = field(default_factory=dict)  # job id -> attempt its inputs were encrypted for

    def spec(self) -> ModelSpec:
        if self._spec is None:
            from msgate.model.patient import checkpoint

            self._spec = model_spec(checkpoint.load(self.checkpoint))
        return self._spec

    def encrypt(self, keys: HeKeys, job_ids: list[str], *, model: str,
                max_batch: int | None = None) -> list[EncryptedPack]:
        spec = self.spec()
        if model != spec.fingerprint:
            raise Rejected("the worker's patient model differs from the key service's (scaler or ensemble); "
                           "deploy the same checkpoint to both", code="he_model_mismatch")
        u = job_inputs(self.store, job_ids, spec, actor=self.actor, key_id=keys.active_id(), issued=self.issued)
        packs = keys.encrypt(u, job_ids, widths=spec.widths, max_batch=max_batch)
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
    log.info("CKKS key service ready", extra={"role": "keys", "key_id": key_id})
    if not stop.is_set():
        serve(keys, settings, stop, jobs=JobSource(store))
