"""The EHR side of a case: which patient and order a study links to, and its feature snapshot.

Linking (blind indexes; one decryption, the PatientID check below): the study's own patient (``Study.patient_id``, set
when an HL7 identifier matches the DICOM ``IssuerOfPatientID|PatientID``, else that identifier looked up
directly), and the order with the study's accession number (``Order.accession_index``) when that order
belongs to the same patient. When the study's identifier links to no patient, an order found by accession
gives the patient only if that patient has an identifier with the study's DICOM PatientID as its value
(any assigning authority: scanners rarely send IssuerOfPatientID); an order of another patient with the
same accession number (numbers are unique only per issuer) is never used.
Merged patients resolve to the survivor. The snapshot is taken at the study date with the
feature schema's validity windows (``storage.repo_ehr.snapshot``); age and sex fall back to the DICOM
header when the EHR has no demographics.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, tzinfo
from typing import Any

import numpy as np
from sqlmodel import Session, col, select

from msgate.model.features import FEATURES
from msgate.model.types import EhrVector
from msgate.storage import repo_ehr
from msgate.storage.crypto import FieldCipher
from msgate.storage.models import Order, Patient, PatientIdentifier, Study


@dataclass(frozen=True)
class EhrLink:
    patient_id: int | None
    order_id: int | None
    via_order: bool = False  # the patient came from the accession's order (the study's identifier linked none)


def link(session: Session, study: Study, cipher: FieldCipher) -> EhrLink:
    patient_id = study.patient_id
    if patient_id is None and study.dicom_patient_index:
        ident = session.exec(select(PatientIdentifier)
                             .where(PatientIdentifier.id_index == study.dicom_patient_index)).first()
        patient_id = ident.patient_id if ident is not None else None
    patient_id = _survivor_id(session, patient_id)
    order = None
    if study.accession_index:
        for candidate in session.exec(select(Order).where(Order.accession_index == study.accession_index)
                                      .order_by(col(Order.updated_at).desc())).all():
            owner = _survivor_id(session, candidate.patient_id)
            if patient_id is not None and owner in (None, patient_id):
                order = candidate
                break
            if patient_id is None and owner is not None and repo_ehr.holds_study_id(session, cipher, owner, study):
                order, patient_id = candidate, owner  # the accession's order, of the images' own patient
                return EhrLink(patient_id, order.id, via_order=True)
    return EhrLink(patient_id, order.id if order is not None else None)


def _survivor_id(session: Session, patient_id: int | None) -> int | None:
    if patient_id is None:
        return None
    patient = session.get(Patient, patient_id)
    return repo_ehr.survivor(session, patient).id if patient is not None else None


def study_datetime(cipher: FieldCipher, study: Study, zone: tzinfo = UTC) -> datetime:
    """End of the study day in the site's zone (StudyDate is local), as UTC: nothing observed after the
    study's local day reaches its case. The ready time when the study has no StudyDate."""
    raw = cipher.decrypt(study.study_date_enc, column="study.study_date") or ""
    try:
        day = datetime.strptime(raw[:8], "%Y%m%d").date()
        return datetime.combine(day, time(23, 59, 59), tzinfo=zone).astimezone(UTC)
    except ValueError:
        return study.ready_at or study.first_received_at


def snapshot(session: Session, cipher: FieldCipher, study: Study, ehr_link: EhrLink,
             zone: tzinfo = UTC) -> dict[str, Any]:
    """Feature name -> {"value", "observed_at", "source", ...} or None (missing or expired)."""
    at = study_datetime(cipher, study, zone)
    patient = session.get(Patient, ehr_link.patient_id) if ehr_link.patient_id is not None else None
    snap: dict[str, Any] = ({spec.name: None for spec in FEATURES} if patient is None
                            else repo_ehr.snapshot(session, cipher, patient, at))
    if snap.get("age") is None:
        birth = cipher.decrypt(study.patient_birth_date_enc, column="study.birth_date") or ""
        age = repo_ehr._age(birth, at.date()) if len(birth) >= 8 else None
        snap["age"] = {"value": age, "unit": "a", "observed_at": None, "source": "dicom"} if age else None
    if snap.get("sex") is None:
        sex = cipher.decrypt(study.patient_sex_enc, column="study.sex")
        snap["sex"] = {"value": sex, "unit": "", "observed_at": None, "source": "dicom"} if sex in ("F", "M") else None
    return snap


def values(snap: Mapping[str, Any]) -> dict[str, Any]:
    return {name: (entry or {}).get("value") if entry else None for name, entry in snap.items()}


def snapshot_hash(snap: Mapping[str, Any]) -> str:
    """A hash of what the model would see (values and their dates), not of where they came from."""
    doc = {name: None if not entry else [entry.get("value"), str(entry.get("observed_at"))]
           for name, entry in sorted(snap.items())}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def missing(snap: Mapping[str, Any]) -> list[str]:
    return [spec.name for spec in FEATURES if not snap.get(spec.name) or snap[spec.name].get("value") is None]


def vector(snap: Mapping[str, Any]) -> EhrVector:
    """The EhrVector: numeric as given; binary/categorical as the index into the spec's categories.

    Same encoding as ``msgate.model.patient.ehr.ehr_vector``; a value that does not fit its spec
    (an unknown category, a non-numeric number) counts as missing rather than failing the case.
    """
    vals = np.zeros(len(FEATURES), np.float32)
    present = np.zeros(len(FEATURES), bool)
    raw = values(snap)
    for i, spec in enumerate(FEATURES):
        value = raw.get(spec.name)
        if value is None:
            continue
        try:
            vals[i] = float(value) if spec.kind == "numeric" else float(spec.categories.index(str(value)))
        except (TypeError, ValueError):
            continue
        if not np.isfinite(vals[i]):  # a stored "nan"/"inf": missing, not a value
            vals[i] = 0.0
            continue
        present[i] = True
    return EhrVector(vals, present, tuple(f.name for f in FEATURES))
