"""Test double of the model module (``load_model`` + ``predict``) and study builders for the worker tests.

``DoubleModel`` is NOT the model: a small deterministic stand-in with the same signature as
``msgate.model.predict``, so the queue semantics (idempotency, kills, retries, batching) are tested
without training. Knobs (environment, so a worker subprocess sees them):
``MSGATE_TEST_PREDICT_SLEEP`` seconds per predict call, ``MSGATE_TEST_PREDICT_MARK`` a file that gets
one line per predict call ("<n cases> <case ids>"), written before the sleep.
This file holds no tests; it is importable as ``test_workers_double`` from ``tests/integration``.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid

from msgate.model.types import EDSS_BINS, Case, ModelResult
from msgate.storage import repo_ehr, repo_studies
from msgate.storage.models import Observation
from msgate.storage.store import Store

MODEL_VERSION = "double-1"
MODEL_NAME = "msgate-test-double"
LOADED: dict[str, str] = {}


def load_model(device: str = "cpu") -> None:
    LOADED["device"] = device


def predict(cases: Sequence[Case]) -> list[ModelResult]:
    mark = os.environ.get("MSGATE_TEST_PREDICT_MARK")
    if mark:
        with open(mark, "a") as handle:
            handle.write(f"{len(cases)} {' '.join(c.case_id for c in cases)}\n")
    time.sleep(float(os.environ.get("MSGATE_TEST_PREDICT_SLEEP", "0")))
    out = []
    for case in cases:
        flair = case.flair.data
        score = float(np.tanh(flair.mean() / (flair.std() + 1e-6)))
        probs = np.full(len(EDSS_BINS), 1.0 / len(EDSS_BINS))
        out.append(ModelResult(
            case_id=case.case_id, model_name=MODEL_NAME, model_version=MODEL_VERSION,
            edss_probabilities=tuple(float(p) for p in probs), edss_estimate=2.0, confidence=0.25,
            uncertainty=0.5, p_ms=(score + 1) / 2, lesions=(), lesion_mask=np.zeros(flair.shape, np.int16),
            heatmap=None, ehr_contributions={n: 0.0 for n, p in zip(case.ehr.names, case.ehr.present) if p},
            flags=tuple(f"ehr_missing:{n}" for n, p in zip(case.ehr.names, case.ehr.present) if not p)))
    return out


# --- study builders ---------------------------------------------------------------------------------

def mr_slice(*, study_uid: str, series_uid: str, index: int, description: str, mrn: str, accession: str,
             rows: int = 16, cols: int = 16, z: float | None = None, seed: int = 0, rle: bool = False,
             corrupt: bool = False) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.99"
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "DOUBLE^TEST", mrn, accession
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate = "19800101", "F", "20261101"
    ds.Modality, ds.SeriesDescription, ds.ProtocolName = "MR", description, description
    ds.SeriesNumber, ds.InstanceNumber = 1 if "FLAIR" in description else 2, index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index) if z is None else z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    pixels = np.random.default_rng(seed * 1000 + index).integers(0, 4000, (rows, cols), dtype=np.uint16)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if rle:
        ds.compress(RLELossless, pixels)
    else:
        ds.PixelData = pixels.tobytes()
    if corrupt:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def add_series(store: Store, *, study_uid: str, role: str, mrn: str, accession: str, slices: int = 8,
               seed: int = 0, rle: bool = False, corrupt: bool = False, size: int = 16) -> int:
    series_uid = generate_uid()
    stored = None
    for k in range(slices):
        data = mr_slice(study_uid=study_uid, series_uid=series_uid, index=k, description=f"AX {role}", mrn=mrn,
                        accession=accession, seed=seed, rle=rle, corrupt=corrupt, rows=size, cols=size)
        stored = store.ingest.store_instance(source=data, calling_aet="TEST")
    assert stored is not None
    with store.db.session() as session:
        repo_studies.set_series_role(session, series_id=stored.series_id, role=role)
        repo_studies.set_study_route(session, study_id=stored.study_id, route="pipeline")
    return stored.study_id


def mark_ready(store: Store, study_id: int) -> None:
    """What the listener's readiness tracker does: state ready, ready_at, runs, audit."""
    with store.db.session() as session:
        repo_studies.reopen(session, study_id=study_id)
    with store.db.session() as session:
        repo_studies.finish(session, study_id=study_id, state="ready", reason="released", roles=["FLAIR"],
                            missing=[])


def make_study(store: Store, *, seed: int = 0, roles: Sequence[str] = ("FLAIR",), corrupt_role: str | None = None,
               mrn: str | None = None, rle: bool = False, slices: int = 8, size: int = 16) -> tuple[int, str]:
    """A ready study; returns (study id, study UID)."""
    study_uid = generate_uid()
    mrn = mrn or f"MRN{seed:05d}"
    study_id = 0
    for role in roles:
        study_id = add_series(store, study_uid=study_uid, role=role, mrn=mrn, accession=f"ACC{seed:05d}",
                              seed=seed, rle=rle, corrupt=(role == corrupt_role), slices=slices, size=size)
    mark_ready(store, study_id)
    return study_id, study_uid


def add_patient(store: Store, *, mrn: str, nfl: float | None = None, sex: str | None = "F",
                birth: str | None = "19800101") -> int:
    """An HL7-side patient with the MRN of the DICOM studies (no issuer), and optionally an NfL value."""
    with store.db.session() as session:
        patient = repo_ehr.upsert_patient(session, store.cipher, [repo_ehr.Identifier(mrn)], birth_date=birth,
                                          sex=sex)
        if nfl is not None:
            session.add(Observation(patient_id=patient.id, feature="nfl", code="101281-4", code_system="LN",
                                    value_enc=store.cipher.encrypt(str(nfl), column="observation.value"),
                                    value_type="NM", unit="pg/mL", observed_at=datetime(2026, 10, 1, tzinfo=UTC)))
        session.flush()
        assert patient.id is not None
        return patient.id
