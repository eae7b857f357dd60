"""msgate: a hospital-side AI worker for Multiple Sclerosis (DICOM + HL7 in, SR + ORU out)."""

__version__ = "0.1.0"
