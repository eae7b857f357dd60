"""HL7 v2.5.1 ER7 messages for one synthetic subject: ADT^A04, ORM^O01, ORU^R01.

Built from string templates (segments joined by carriage returns). The ORM
carries the DICOM AccessionNumber in OBR-18 (IHE Radiology) and the same
placer/filler numbers in ORC-2/3 and OBR-2/3. The ORU carries one OBX per
observed EHR feature, coded as in ``msgate.model.features`` (LOINC ``LN`` or
local ``L``), observation time in OBX-14, all dated before the scan. The
EDSS is sent too (local code ``MS-EDSS``): it is the label, and the feature
builder must not read it as an input.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from msgate.model.features import EDSS_LABEL, FEATURE_BY_NAME, FeatureSpec
from msgate.model.synth.ehr import Observation

FIELD_SEP = "|"
ENCODING = "^~\\&"
TEXT: dict[str, str] = {
    "disease_duration": "Multiple sclerosis disease duration",
    "t25fw": "Timed 25-Foot Walk",
    "nhpt": "9-Hole Peg Test, mean of both hands",
    "sdmt": "Symbol Digit Modalities Test",
    "nfl": "Neurofilament light chain [Mass/volume] in Plasma",
    "ocb": "Oligoclonal bands [Presence] in Cerebral spinal fluid",
    "igg_index": "IgG index in Serum and CSF",
    "relapses_2y": "Number of relapses in the last 2 years",
    "dmt": "Current disease-modifying therapy",
    "edss": "Expanded Disability Status Scale",
}


@dataclass(frozen=True)
class Hl7Context:
    """Identifiers and times shared by a subject's messages."""

    mrn: str
    family: str
    given: str
    birth_date: str
    sex: str
    accession: str
    placer: str
    filler: str
    scan: datetime


def _ts(t: datetime | date) -> str:
    return t.strftime("%Y%m%d%H%M") if isinstance(t, datetime) else t.strftime("%Y%m%d")


def segment(name: str, fields: dict[int, str]) -> str:
    """Build a segment from {field number: value}; gaps become empty fields."""
    top = max(fields) if fields else 0
    return FIELD_SEP.join([name] + [fields.get(i, "") for i in range(1, top + 1)])


def _msh(msg_type: str, control_id: str, when: datetime) -> str:
    return "MSH|" + FIELD_SEP.join([
        ENCODING, "SYNTH_HIS", "SYNTH_HOSP", "MSGATE", "SYNTH_HOSP", _ts(when), "", msg_type,
        control_id, "P", "2.5.1", "", "", "AL", "NE",
    ])


def _pid(c: Hl7Context) -> str:
    return segment("PID", {1: "1", 3: f"{c.mrn}^^^SYNTH^MR", 5: f"{c.family}^{c.given}", 7: c.birth_date, 8: c.sex})


def _pv1() -> str:
    return segment("PV1", {1: "1", 2: "O", 3: "NEURO^^^SYNTH_HOSP"})


def join(segments: list[str]) -> str:
    """ER7 message text: segments separated (and terminated) by carriage returns."""
    return "\r".join(segments) + "\r"


def adt_a04(c: Hl7Context, when: datetime) -> str:
    """Register the outpatient (ADT^A04)."""
    return join([_msh("ADT^A04^ADT_A01", f"{c.mrn}-A04", when), segment("EVN", {1: "A04", 2: _ts(when)}),
                 _pid(c), _pv1()])


def orm_o01(c: Hl7Context, when: datetime) -> str:
    """Order the MRI (ORM^O01) with the accession in OBR-18."""
    placer, filler = f"{c.placer}^SYNTH_HIS", f"{c.filler}^SYNTH_RIS"
    orc = segment("ORC", {1: "NW", 2: placer, 3: filler, 5: "SC", 9: _ts(when)})
    obr = segment("OBR", {1: "1", 2: placer, 3: filler, 4: "MRBRAIN^MRI brain without contrast, MS protocol^L",
                          6: _ts(c.scan), 18: c.accession, 19: c.accession, 24: "MR"})
    return join([_msh("ORM^O01^ORM_O01", f"{c.mrn}-O01", when), _pid(c), _pv1(), orc, obr])


def _units(spec: FeatureSpec) -> str:
    return f"{spec.unit}^{spec.unit}^UCUM" if spec.unit else ""


def _obx(i: int, spec: FeatureSpec, value: object, when: date) -> str:
    code, system = spec.primary_code
    ident = f"{code}^{TEXT[spec.name]}^{system}"
    if spec.kind == "numeric":
        vtype, val = "NM", str(value)
    else:
        vtype, val = "CE", f"{value}^{str(value).replace('_', ' ')}^L"
    return segment("OBX", {1: str(i), 2: vtype, 3: ident, 5: val, 6: _units(spec), 11: "F", 14: _ts(when)})


def oru_r01(c: Hl7Context, obs: list[Observation], edss: tuple[float, date] | None, when: datetime) -> str:
    """Clinical and laboratory results (ORU^R01); age and sex travel in PID only."""
    lab_placer, lab_filler = f"{c.placer}L^SYNTH_HIS", f"{c.filler}L^SYNTH_LAB"
    orc = segment("ORC", {1: "RE", 2: lab_placer, 3: lab_filler})
    obr = segment("OBR", {1: "1", 2: lab_placer, 3: lab_filler, 4: "MSPANEL^MS clinical and laboratory panel^L",
                          7: _ts(when), 22: _ts(when), 25: "F"})
    obx = [o for o in obs if o.name not in ("age", "sex")]
    segs = [_obx(i + 1, FEATURE_BY_NAME[o.name], o.value, o.when) for i, o in enumerate(obx)]
    if edss is not None:
        segs.append(_obx(len(segs) + 1, EDSS_LABEL, f"{edss[0]:.1f}", edss[1]))
    return join([_msh("ORU^R01^ORU_R01", f"{c.mrn}-R01", when), _pid(c), orc, obr] + segs)
