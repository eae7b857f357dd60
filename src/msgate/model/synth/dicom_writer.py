"""Write a synthetic series as MR Image Storage files (PS3.3 A.4), one per axial slice.

Geometry (verified against MONAI's PydicomReader): the volume is an axis-
aligned RAS grid; slice k is ``pixels[:, :, k].T`` (rows = j, columns = i),
``ImageOrientationPatient = [-1,0,0, 0,-1,0]`` (LPS) and
``ImagePositionPatient = (-x, -y, z)`` of the RAS affine applied to (0, 0, k).
Transfer syntaxes: Explicit VR Little Endian, JPEG 2000 lossless, RLE lossless.
Optionally the slices are merged into one Legacy Converted Enhanced MR
multi-frame object (highdicom).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
)

from msgate.model.synth.contrasts import Series

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "j2k": JPEG2000Lossless,
    "rle": RLELossless,
}
IMPLEMENTATION_UID = UID("1.2.826.0.1.3680043.8.498.1")  # pydicom's root, as generate_uid uses
SEQUENCE = {  # ScanningSequence, SequenceVariant, TR ms, TE ms, TI ms, flip deg
    ("FLAIR", "3D"): ("SE\\IR", "SK\\SP\\MP", 5000.0, 390.0, 1800.0, 120.0),
    ("FLAIR", "2D"): ("SE\\IR", "SK\\SP", 9000.0, 85.0, 2500.0, 150.0),
    ("T1", "3D"): ("GR\\IR", "SK\\SP\\MP", 2300.0, 2.98, 900.0, 9.0),
    ("T1", "2D"): ("SE", "SK\\SP", 550.0, 10.0, 0.0, 90.0),
    ("QSM", "3D"): ("GR", "SP", 40.0, 20.0, 0.0, 15.0),
}


def uid(*parts: object) -> UID:
    """Deterministic 2.25 UID (PS3.5 B.2) from a SHA-256 of its parts: no clock, no randomness."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return UID(f"2.25.{int.from_bytes(digest[:16], 'big')}")


@dataclass(frozen=True)
class StudyInfo:
    """Patient, study and equipment attributes shared by every series of a subject."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str  # AS, e.g. "045Y"
    study_uid: str
    frame_uid: str
    study_date: str
    study_time: str
    accession: str
    study_id: str
    manufacturer: str
    model: str
    field_strength: float


@dataclass(frozen=True)
class SeriesInfo:
    """Series attributes: UID, number and vendor-style names."""

    uid: str
    number: int
    description: str
    protocol_name: str


def _ds(v: float) -> str:
    """Decimal String of at most 16 characters."""
    return f"{v:.6g}"


def _study_header(st: StudyInfo) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = st.patient_name, st.patient_id, "SYNTH"
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = st.birth_date, st.sex, st.age
    ds.PatientIdentityRemoved = "NO"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = st.study_uid, st.study_date, st.study_time
    ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", st.study_id, st.accession
    ds.StudyDescription = "MRI BRAIN MS PROTOCOL"
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = st.frame_uid, ""
    ds.Manufacturer, ds.ManufacturerModelName = st.manufacturer, st.model
    ds.InstitutionName, ds.StationName = "SYNTHETIC HOSPITAL", "SYNTHMR01"
    ds.SoftwareVersions, ds.DeviceSerialNumber = "msgate-synth", "0000"
    ds.MagneticFieldStrength, ds.ImagedNucleus = _ds(st.field_strength), "1H"
    ds.ImagingFrequency = _ds(42.577478 * st.field_strength)
    ds.ImageComments = "SYNTHETIC DATA - NOT A REAL PATIENT"
    return ds


def _series_header(s: Series, st: StudyInfo, se: SeriesInfo) -> Dataset:
    ds = _study_header(st)
    acq, aff = s.acq, s.affine
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", se.uid, se.number
    ds.SeriesDescription, ds.ProtocolName = se.description, se.protocol_name
    ds.BodyPartExamined, ds.PatientPosition = "BRAIN", "HFS"
    ds.SeriesDate, ds.SeriesTime = st.study_date, st.study_time
    ds.AcquisitionDate, ds.ContentDate, ds.ContentTime = st.study_date, st.study_date, st.study_time
    ds.ImageType = ["DERIVED", "PRIMARY", "QSM"] if acq.role == "QSM" else ["ORIGINAL", "PRIMARY", "M", "ND"]
    seq, var, tr, te, ti, flip = SEQUENCE[(acq.role, acq.mode)]
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = seq.split("\\"), var.split("\\"), ""
    ds.MRAcquisitionType = acq.mode
    ds.RepetitionTime, ds.EchoTime, ds.FlipAngle = _ds(tr), _ds(te), _ds(flip)
    if ti:
        ds.InversionTime = _ds(ti)
    ds.EchoTrainLength, ds.AcquisitionNumber = 1, 1
    ds.SliceThickness, ds.SpacingBetweenSlices = _ds(aff[2, 2]), _ds(aff[2, 2])
    ds.PixelSpacing = [_ds(aff[1, 1]), _ds(aff[0, 0])]
    ds.ImageOrientationPatient = ["-1", "0", "0", "0", "-1", "0"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(s.pixels.shape[1]), int(s.pixels.shape[0])
    signed = s.pixels.dtype == np.int16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16 if signed else 12, 15 if signed else 11
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(s.intercept), _ds(s.slope), "US"
    if acq.role == "QSM":
        ds.RescaleType = "PPM"
    ds.BurnedInAnnotation, ds.SOPClassUID = "NO", MRImageStorage
    ds.WindowCenter, ds.WindowWidth = _window(s)
    return ds


def _window(s: Series) -> tuple[str, str]:
    """Display window in output units: ±0.15 ppm for QSM, 0..p99.5 for magnitude images."""
    if s.acq.role == "QSM":
        return "0", "0.3"
    top = float(np.percentile(s.pixels[::4, ::4, ::2], 99.5)) * s.slope + s.intercept
    return _ds(round(top / 2.0)), _ds(round(max(top, 1.0)))


def _slice(header: Dataset, s: Series, k: int, sop_uid: str) -> Dataset:
    """One slice: the shared header plus position, number and pixels."""
    ds = Dataset()
    ds.update(header)
    p = s.affine @ np.array([0.0, 0.0, float(k), 1.0])
    ds.ImagePositionPatient = [_ds(-p[0]), _ds(-p[1]), _ds(p[2])]
    ds.SliceLocation, ds.InstanceNumber, ds.SOPInstanceUID = _ds(p[2]), k + 1, sop_uid
    ds.PixelData = np.ascontiguousarray(s.pixels[:, :, k].T).tobytes()
    return ds


def _file_meta(ds: Dataset, ts: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID, meta.ImplementationClassUID = ts, IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MSGATE_SYNTH"
    return meta


def _encode(ds: Dataset, ts: UID) -> None:
    """Attach the file meta and compress in place for the encapsulated syntaxes."""
    ds.file_meta = _file_meta(ds, ExplicitVRLittleEndian)
    if ts != ExplicitVRLittleEndian:
        ds.compress(ts, encoding_plugin="pylibjpeg", generate_instance_uid=False)


def build_slices(s: Series, st: StudyInfo, se: SeriesInfo) -> list[Dataset]:
    """All slice datasets of a series (uncompressed)."""
    header = _series_header(s, st, se)
    return [_slice(header, s, k, uid(se.uid, k)) for k in range(s.pixels.shape[2])]


def write_series(s: Series, st: StudyInfo, se: SeriesInfo, out_dir: Path, ts: str = "explicit",
                 enhanced: bool = False) -> list[Path]:
    """Write the series under ``out_dir``; returns the files written."""
    tsuid = TRANSFER_SYNTAXES[ts]
    out_dir.mkdir(parents=True, exist_ok=True)
    slices = build_slices(s, st, se)
    if enhanced:
        return [_write_enhanced(slices, se, out_dir, tsuid)]
    paths = []
    for k, ds in enumerate(slices):
        _encode(ds, tsuid)
        path = out_dir / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _write_enhanced(slices: list[Dataset], se: SeriesInfo, out_dir: Path, ts: UID) -> Path:
    """Merge the slices into one Legacy Converted Enhanced MR Image (highdicom)."""
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    for ds in slices:
        ds.file_meta = _file_meta(ds, ExplicitVRLittleEndian)
    mf = LegacyConvertedEnhancedMRImage(
        legacy_datasets=slices, series_instance_uid=uid(se.uid, "enhanced-series"),
        series_number=se.number + 100, sop_instance_uid=uid(se.uid, "enhanced"), instance_number=1,
        transfer_syntax_uid=ts,
    )
    _pin_generated_values(mf, slices[0], uid(se.uid, "dimension-organization"))
    path = out_dir / "enhanced.dcm"
    mf.save_as(path, enforce_file_format=True)
    return path


def _pin_generated_values(mf: Dataset, first: Dataset, dim_uid: str) -> None:
    """Replace the clock times and random UIDs highdicom sets, for reproducible bytes."""
    mf.InstanceCreationDate, mf.InstanceCreationTime = first.ContentDate, first.ContentTime
    for item in mf.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = first.ContentDate + first.ContentTime
    for item in list(mf.get("DimensionOrganizationSequence", [])) + list(mf.get("DimensionIndexSequence", [])):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = dim_uid


def volume_values(s: Series) -> NDArray[np.float32]:
    """The physical voxel values a reader should see (pixels * slope + intercept)."""
    return (s.pixels.astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept)).astype(np.float32)
