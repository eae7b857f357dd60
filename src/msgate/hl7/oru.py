"""ORU^R01 v2.5.1 builder for model results, strictly validated with hl7apy before it leaves.

Segments: MSH, PID, ORC, OBR (accession in OBR-18 per IHE Radiology, placer OBR-2, filler OBR-3,
OBR-25 result status), one OBX per finding (NM/CE/ST, units, OBX-11 ``P`` until a clinician verifies,
OBX-17 method = algorithm name and version), an RP/ST OBX with the SR SOP Instance UID, and an NTE
disclaimer. Values are escaped by hl7apy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException

from msgate.errors import Rejected

DISCLAIMER = "Unverified AI output, not for diagnosis. Results require review by a qualified clinician."


@dataclass(frozen=True)
class Finding:
    code: str
    system: str
    text: str
    value_type: Literal["NM", "CE", "ST"]
    value: str
    units: str = ""
    sub_id: str = ""  # OBX-4: groups the values of one lesion ("1", "2", ...)


@dataclass(frozen=True)
class OruInput:
    """What the publisher knows about one result."""

    patient_id: str
    patient_authority: str
    accession: str
    placer_number: str
    filler_number: str
    sr_sop_instance_uid: str
    model_name: str
    model_version: str
    control_id: str
    findings: tuple[Finding, ...] = field(default=())
    status: Literal["P", "C", "F"] = "P"
    patient_name: str = ""
    observed_at: datetime | None = None
    sending_application: str = "MSGATE"
    sending_facility: str = "MSGATE"
    receiving_application: str = "EHR"
    receiving_facility: str = "HOSPITAL"
    service_code: str = "MSAI"
    service_text: str = "MS MRI AI analysis"
    notes: tuple[str, ...] = ()


def _ts(value: datetime | None = None) -> str:
    return (value or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d%H%M%S")


def build_oru(result: OruInput) -> str:
    """The ER7 text (segments joined by CR). Raises Rejected if hl7apy's strict validation fails."""
    try:
        msg = Message("ORU_R01", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
        msg.msh.msh_3 = result.sending_application
        msg.msh.msh_4 = result.sending_facility
        msg.msh.msh_5 = result.receiving_application
        msg.msh.msh_6 = result.receiving_facility
        msg.msh.msh_7 = _ts()
        msg.msh.msh_9 = "ORU^R01^ORU_R01"
        msg.msh.msh_10 = result.control_id
        msg.msh.msh_11 = "P"
        msg.msh.msh_12 = "2.5.1"
        msg.msh.msh_15 = "AL"
        msg.msh.msh_16 = "NE"
        _body(msg, result)
        msg.validate()
        return str(msg.to_er7()).replace("\n", "\r")
    except HL7apyException as exc:
        raise Rejected(f"ORU failed strict validation ({type(exc).__name__})", code="oru_invalid") from None


def _body(msg: Message, r: OruInput) -> None:
    pr = msg.add_group("ORU_R01_PATIENT_RESULT")
    patient = pr.add_group("ORU_R01_PATIENT")
    patient.pid.pid_1 = "1"
    patient.pid.pid_3 = f"{r.patient_id}^^^{r.patient_authority}^MR"
    patient.pid.pid_5 = r.patient_name or "UNKNOWN"
    oo = pr.add_group("ORU_R01_ORDER_OBSERVATION")
    oo.orc.orc_1 = "RE"
    oo.orc.orc_2 = r.placer_number
    oo.orc.orc_3 = r.filler_number
    oo.obr.obr_1 = "1"
    oo.obr.obr_2 = r.placer_number
    oo.obr.obr_3 = r.filler_number
    oo.obr.obr_4 = f"{r.service_code}^{r.service_text}^L"
    oo.obr.obr_7 = _ts(r.observed_at)
    oo.obr.obr_18 = r.accession
    oo.obr.obr_22 = _ts()
    oo.obr.obr_25 = r.status
    method = f"{r.model_name}^{r.model_name} {r.model_version}^L"
    n = 0
    for finding in r.findings:
        n += 1
        obs = oo.add_group("ORU_R01_OBSERVATION")
        obs.obx.obx_1 = str(n)
        obs.obx.obx_2 = finding.value_type
        obs.obx.obx_3 = f"{finding.code}^{finding.text}^{finding.system}"
        if finding.sub_id:
            obs.obx.obx_4 = finding.sub_id
        obs.obx.obx_5 = finding.value
        if finding.units:
            obs.obx.obx_6 = finding.units
        obs.obx.obx_11 = r.status
        obs.obx.obx_14 = _ts(r.observed_at)
        obs.obx.obx_17 = method
    obs = oo.add_group("ORU_R01_OBSERVATION")
    obs.obx.obx_1 = str(n + 1)
    obs.obx.obx_2 = "ST"
    obs.obx.obx_3 = "113014^DICOM SR Instance UID^DCM"  # the SR that carries the same result
    obs.obx.obx_5 = r.sr_sop_instance_uid
    obs.obx.obx_11 = r.status
    obs.obx.obx_17 = method
    for number, text in enumerate((DISCLAIMER, *r.notes), start=1):
        nte = oo.add_segment("NTE")
        nte.nte_1 = str(number)
        nte.nte_3 = text
