"""Small synthetic DICOM objects for tests (no real patient data)."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

KNOWN_NAME = "PHITEST^ZELDA"
KNOWN_MRN = "MRN8675309"
KNOWN_ACCESSION = "ACC24681357"


def mr_slice(*, study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None,
             index: int = 0, rows: int = 32, cols: int = 32, name: str = KNOWN_NAME, mrn: str = KNOWN_MRN,
             accession: str = KNOWN_ACCESSION, description: str = "AX FLAIR", seed: int = 0) -> bytes:
    """One MR Image Storage slice as the bytes a C-STORE would carry (file meta + dataset)."""
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.AccessionNumber = name, mrn, accession
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate = "19700101", "F", "20261101"
    ds.Modality, ds.SeriesDescription, ds.ProtocolName = "MR", description, description
    ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.random.default_rng(seed + index).integers(0, 4000, (rows, cols), dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
