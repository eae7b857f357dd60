"""Training data from msgate's own store: studies that came in through the DICOM listener, EHR and
EDSS labels that came in through the HL7 feed (``msgate train patient --from-store``).

Cases are built exactly as the workers build them for inference (``workers.case.load``: the series
chosen per role as the scheduler chooses them, in-memory decryption, the EHR snapshot at the study date),
audited as ``decrypt.training`` instead of ``decrypt.inference``. The label is the EDSS observation
(``model.features.EDSS_LABEL``: code ``MS-EDSS``, local system ``L``) of the study's linked patient
that lies closest to the study date and at most ``EDSS_LABEL.validity_days`` (180) before or after it;
withdrawn observations are ignored. Its decryption is audited too (one event per study, internal ids
only). Studies without a linked patient, a FLAIR series or an EDSS label are skipped and counted.

The store holds no MS/cSVD diagnosis and no Rim+ truth, so those labels are NaN: the training loss
masks them (the MS and Rim+ heads keep what the base checkpoint learnt when training starts from it).
Everything stays in memory: no decrypted image, value or identifier is written to disk or logged
(logs carry counts and reason codes only). Rows are grouped by the internal patient id for a
patient-level split.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import func
from sqlmodel import Session, col, select

from msgate.errors import Rejected
from msgate.model.features import EDSS_LABEL
from msgate.model.patient.lesionsrc import LesionSource
from msgate.model.patient.presets import Preset
from msgate.model.patient.synthdata import case_arrays, stack_rows
from msgate.model.types import edss_class
from msgate.storage import audit
from msgate.storage.models import Observation, Series, Study
from msgate.storage.repo_studies import FINAL_STATES
from msgate.storage.store import Store
from msgate.workers import case as case_mod
from msgate.workers import ehr as ehr_mod

log = logging.getLogger(__name__)
ACTOR = "train.patient"


@dataclass(frozen=True)
class Candidate:
    """A stored study that can become a training row (internal ids only)."""

    study_id: int
    patient_id: int
    series: dict[str, int]


def candidates(store: Store) -> tuple[list[Candidate], Counter[str]]:
    """Complete studies with a FLAIR series and a linked patient; skip reasons counted."""
    out: list[Candidate] = []
    skipped: Counter[str] = Counter()
    with store.db.session() as session:
        for study in session.exec(select(Study).where(col(Study.state).in_(sorted(FINAL_STATES)))
                                  .order_by(col(Study.id))).all():
            chosen = case_mod.choose_series(list(session.exec(select(Series).where(Series.study_id == study.id)).all()))
            link = ehr_mod.link(session, study, store.cipher)
            if "FLAIR" not in chosen:
                skipped["no_flair"] += 1
            elif link.patient_id is None:
                skipped["no_patient"] += 1
            else:
                out.append(Candidate(int(study.id or 0), link.patient_id,
                                     {role: int(s.id or 0) for role, s in chosen.items()}))
    return out, skipped


def _label_rows(session: Session, patient_id: int, at: datetime) -> list[Observation]:
    window = timedelta(days=EDSS_LABEL.validity_days)
    codes = [c.upper() for c, _ in EDSS_LABEL.codes]
    rows = session.exec(select(Observation).where(
        Observation.patient_id == patient_id, func.upper(Observation.code).in_(codes),
        col(Observation.withdrawn).is_(False),
        col(Observation.observed_at) >= at - window, col(Observation.observed_at) <= at + window)).all()
    return sorted(rows, key=lambda r: (abs((r.observed_at - at).total_seconds()) if r.observed_at else 1e12,
                                       -(r.id or 0)))


def edss_label(store: Store, cand: Candidate, run_id: str) -> float | None:
    """The study's EDSS label (audited decryption of the study date and of the chosen value), or None."""
    with store.db.session() as session:
        study = session.get(Study, cand.study_id)
        if study is None:
            return None
        audit.append(session, kind="decrypt.training", actor=ACTOR, subject=f"train:{run_id}",
                     detail={"study_id": cand.study_id, "patient_id": cand.patient_id, "label": EDSS_LABEL.name})
        at = ehr_mod.study_datetime(store.cipher, study, store.settings.site_zone)
        for row in _label_rows(session, cand.patient_id, at):
            try:
                value = float(store.cipher.decrypt(row.value_enc, column="observation.value") or "")
            except ValueError:
                continue
            if 0.0 <= value <= 10.0:
                return value
    return None


def _row(store: Store, cand: Candidate, preset: Preset, source: LesionSource, run_id: str,
         edss: float) -> dict[str, object]:
    loaded = case_mod.load(store, job_id=f"train-{run_id}-{cand.study_id}", study_id=cand.study_id,
                           series=cand.series, actor=ACTOR, audit_kind="decrypt.training")
    row: dict[str, object] = dict(case_arrays(loaded.case, preset, source))
    row.update(edss=edss, edss_class=edss_class(edss), ms=np.nan, n_rim=np.nan, group=cand.patient_id)
    return row


def collect(store: Store, preset: Preset, source: LesionSource, *,
            limit: int | None = None) -> tuple[dict[str, NDArray[np.generic]], Counter[str]]:
    """Training arrays (``synthdata`` cache layout plus ``group`` = internal patient id) of every
    usable stored study, and the skip counts by reason code."""
    run_id = uuid.uuid4().hex[:12]
    cands, skipped = candidates(store)
    rows: list[dict[str, object]] = []
    for cand in cands[:limit]:
        edss = edss_label(store, cand, run_id)
        if edss is None:
            skipped["no_edss_label"] += 1
            continue
        try:
            row = _row(store, cand, preset, source, run_id, edss)
        except Rejected as exc:
            skipped[exc.code or "rejected"] += 1
            continue
        row["index"] = len(rows) + 1
        rows.append(row)
    log.info("training set from the store: %d studies used, skipped %s", len(rows), dict(skipped))
    if not rows:
        raise Rejected("no stored study has a FLAIR series, a linked patient and an EDSS label", code="no_training_data")
    return stack_rows(rows), skipped
