"""Coded concepts of msgate's results, shared by the SR, SEG, heatmaps and the ORU.

Standard codes are used where one exists (SCT, DCM, UCUM, LOINC); everything else is in the local
coding scheme ``99MSGATE`` (PS3.3 C.7.6.14: a ``99``-prefixed designator is a private scheme; in HL7
v2 the same designator is a local coding system, table 0396 ``99zzz``). The table is documented in
``docs/results.md``; a code's meaning never changes once released, new meanings get new codes.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from msgate.model.types import EDSS_BINS, LESION_LOCATIONS

SCHEME = "99MSGATE"
SCHEME_VERSION = "1"


def scheme_identification() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification Sequence item that declares ``99MSGATE`` in SR and SEG."""
    return CodingSchemeIdentificationItem(designator=SCHEME, name="msgate local codes", version=SCHEME_VERSION,
                                          responsible_organization="msgate (docs/results.md)")


def local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, SCHEME, meaning)


# Document and procedure
PROCEDURE_MRI_HEAD = codes.LN.MRIHeadReport  # LOINC 24590-2
REPORT_TITLE = codes.DCM.ImagingMeasurementReport  # DCM 126000
DISCLAIMER_NAME = codes.DCM.Comment  # DCM 121106

# Image-level findings
EDSS_CLASS = local("EDSS-CLASS", "EDSS class")
EDSS_CLASS_VALUES: tuple[CodedConcept, ...] = tuple(
    local(f"EDSS-C{i}", f"EDSS {label}") for i, label in enumerate(EDSS_BINS)
)
EDSS_CLASS_PROBABILITY: tuple[CodedConcept, ...] = tuple(
    local(f"EDSS-P{i}", f"Probability of EDSS {label}") for i, label in enumerate(EDSS_BINS)
)
EDSS_ESTIMATE = local("EDSS-EST", "EDSS estimate")
CONFIDENCE = local("CONF", "Calibrated confidence")
UNCERTAINTY = local("UNCERT", "Predictive uncertainty")
DIAGNOSIS = local("DX-MS-CSVD", "Multiple sclerosis versus cerebral small vessel disease")
MULTIPLE_SCLEROSIS = CodedConcept("24700007", "SCT", "Multiple sclerosis")
SMALL_VESSEL_DISEASE = local("CSVD", "Cerebral small vessel disease")
P_MS = local("P-MS", "Probability of multiple sclerosis")
LESION_COUNT = local("LES-N", "Lesion count")
LESION_VOLUME_TOTAL = local("LES-VOL", "Total lesion volume")
RIM_COUNT = local("PRL-N", "Paramagnetic rim lesion count")

# Lesion-level findings
LESION = codes.SCT.Lesion  # SCT 52988006
ABNORMAL_STRUCTURE = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003
RIM_LESION = local("PRL", "Paramagnetic rim lesion")
RIM_STATUS = local("PRL-STATUS", "Paramagnetic rim")
RIM_PROBABILITY = local("P-PRL", "Probability of paramagnetic rim")
LESION_VOLUME = local("LES-VOL-1", "Lesion volume")
LESION_LOCATION = local("LES-LOC", "Lesion location")
VOLUME = codes.SCT.Volume  # SCT 118565006
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
_LOCATION_MEANINGS = {"periventricular": "Periventricular", "juxtacortical": "Juxtacortical",
                      "infratentorial": "Infratentorial", "deep_wm": "Deep white matter"}
LOCATION = {name: local(f"LOC-{name.upper().replace('_', '-')}", _LOCATION_MEANINGS.get(name, name))
            for name in LESION_LOCATIONS}

# Heatmap
SALIENCY = local("GRADCAM", "Grad-CAM saliency")

# Units (UCUM)
UNIT_ONE = codes.UCUM.NoUnits  # "1": probabilities, confidence, uncertainty
UNIT_ML = CodedConcept("mL", "UCUM", "milliliter")
UNIT_SCORE = CodedConcept("{score}", "UCUM", "score")
UNIT_COUNT = CodedConcept("{lesions}", "UCUM", "lesions")


def table() -> list[tuple[str, str, str]]:
    """Every local code as (value, scheme, meaning), for docs/results.md and its test."""
    concepts = [EDSS_CLASS, *EDSS_CLASS_VALUES, *EDSS_CLASS_PROBABILITY, EDSS_ESTIMATE, CONFIDENCE,
                UNCERTAINTY, DIAGNOSIS, SMALL_VESSEL_DISEASE, P_MS, LESION_COUNT, LESION_VOLUME_TOTAL,
                RIM_COUNT, RIM_LESION, RIM_STATUS, RIM_PROBABILITY, LESION_VOLUME, LESION_LOCATION,
                *LOCATION.values(), SALIENCY]
    return [(c.value, c.scheme_designator, c.meaning) for c in concepts]
