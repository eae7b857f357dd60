"""A 3D FLAIR sent as Enhanced MR or Legacy Converted Enhanced MR, with a T1, by DCMTK storescu to a real
``msgate serve --role dicom``: each study is ready with a FLAIR series and the scheduler plans its job on it.

Siemens names its 3D FLAIR ``t2_spc_da-fl_sag_p2_iso``, and an Enhanced MR header has no top-level
InversionTime or ScanningSequence: the FLAIR was ``T2 by name``, the study ended stable ("FLAIR missing")
and never ran."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from dicom_helpers import (
    ENHANCED_MR,
    ListenerProc,
    _base,
    _pixels,
    _save,
    free_port,
    listener_env,
    opened_store,
    storescu,
    write_series,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlmodel import col, select

from msgate.listener.rules import ListenerRules, decide
from msgate.storage.models import Series, Study
from msgate.workers.scheduler import plan

pytestmark = [pytest.mark.integration, pytest.mark.peer]


def _enhanced_flair(path: Path, *, study_uid: str, description: str, frames: int = 12) -> Path:
    """An Enhanced MR Image Storage 3D FLAIR: EchoPulseSequence SPIN, the inversion (InversionRecovery YES,
    InversionTimes 1800 ms) in the shared MR Modifier Sequence, one plane position per frame."""
    ds = _base(study_uid, generate_uid(), description, ENHANCED_MR, 3)
    ds.InstanceNumber, ds.NumberOfFrames, ds.ImageType = 1, frames, ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.EchoPulseSequence, ds.ContentQualification, ds.AcquisitionContrast = "SPIN", "PRODUCT", "FLUID_ATTENUATED"
    modifier = Dataset()
    modifier.InversionRecovery, modifier.InversionTimes = "YES", [1800.0]
    measures, orientation = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [1.0, 1.0], 1.0
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared = Dataset()
    shared.MRModifierSequence, shared.PixelMeasuresSequence = [modifier], [measures]
    shared.PlaneOrientationSequence = [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for index in range(frames):
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, float(index)]
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.stack([_pixels(ds, 32, 32, f) for f in range(frames)]).tobytes()
    return _save(ds, path)


def _legacy_converted_flair(folder: Path, *, study_uid: str, description: str) -> Path:
    """The classic slices of a spin-echo IR (TI 1800 ms) merged by highdicom into one Legacy Converted
    Enhanced MR Image: ScanningSequence and InversionTime only in the Unassigned Converted Attributes."""
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    slices = [dcmread(p) for p in write_series(folder / "classic", count=6, description=description,
                                                 study_uid=study_uid, number=4, size=32, inversion_time=1800.0)]
    frame_of_reference = generate_uid()
    for ds in slices:
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Manufacturer, ds.PatientOrientation = "SYNTH", ["L", "P"]
        ds.ContentDate, ds.ContentTime, ds.SeriesDate, ds.SeriesTime = "20261101", "101010", "20261101", "101010"
    mf = LegacyConvertedEnhancedMRImage(legacy_datasets=slices, series_instance_uid=generate_uid(),
                                        series_number=104, sop_instance_uid=generate_uid(), instance_number=1,
                                        transfer_syntax_uid=ExplicitVRLittleEndian)
    path = folder / "legacy_converted.dcm"
    mf.save_as(path, enforce_file_format=True)
    return path


def test_an_enhanced_mr_flair_and_a_t1_make_the_study_ready_with_its_flair(tmp_path: Path) -> None:
    enhanced_study, converted_study = generate_uid(), generate_uid()
    enhanced = _enhanced_flair(tmp_path / "enhanced" / "flair.dcm", study_uid=enhanced_study,
                               description="t2_spc_da-fl_sag_p2_iso")
    converted = _legacy_converted_flair(tmp_path / "converted", study_uid=converted_study,
                                        description="t2_spc_sag_p2_iso")  # no FLAIR in the name: its TI decides
    assert "InversionTime" not in dcmread(converted, stop_before_pixels=True)
    t1s = [write_series(tmp_path / f"t1_{n}", count=4, description="t1_mprage_sag_p1_iso", study_uid=uid,
                        number=2, size=32, scanning=("GR", "IR"), inversion_time=900.0)
           for n, uid in enumerate((enhanced_study, converted_study))]
    home, port = tmp_path / "home", free_port()
    listener = ListenerProc(home, port, listener_env(home, port, MSGATE_DICOM__QUIET_SECONDS="30")).start()
    try:
        for files in ([*t1s[0], enhanced], [*t1s[1], converted]):  # one association per study
            done = storescu(port, files)
            assert done.returncode == 0, done.stderr
        deadline, states = time.monotonic() + 20, []
        while time.monotonic() < deadline:
            with opened_store(home) as store, store.db.session() as session:
                states = [s.state for s in session.exec(select(Study)).all()]
            if states == ["ready", "ready"]:
                break
            time.sleep(0.05)
        assert states == ["ready", "ready"], listener.log()[-4000:]
    finally:
        listener.stop()
    with opened_store(home) as store, store.db.session() as session:
        for study in session.exec(select(Study).order_by(col(Study.id))).all():
            rows = list(session.exec(select(Series).where(Series.study_id == study.id)
                                     .order_by(col(Series.series_number))).all())
            assert sorted(r.role for r in rows) == ["FLAIR", "T1"]
            flair = next(r for r in rows if r.role == "FLAIR")
            assert flair.frame_count in (6, 12)
            planned = plan(session, store, study, model_version="test")
            assert planned is not None and planned.series["FLAIR"] == flair.id
    for path in (enhanced, converted):  # the decision msgate rules test shows for the same files
        assert decide(dcmread(path, stop_before_pixels=True), ListenerRules()).role.value == "FLAIR"
