"""Synthetic MS / cSVD cohort: DICOM studies, HL7 v2.5.1 files, lesion masks, labels (docs/synthetic-cohort.md)."""

from msgate.model.synth.cohort import generate_cohort

__all__ = ["generate_cohort"]
