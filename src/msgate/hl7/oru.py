"""ORU^R01 v2.5.1 builder for model results, strictly validated with hl7apy before it leaves.

Segments: MSH, PID, ORC, OBR (accession in OBR-18 per IHE Radiology, placer OBR-2, filler OBR-3,
OBR-25 result status), one OBX per finding (NM/CE/ST, units, OBX-11 ``P`` until a clinician verifies,
OBX-17 method = algorithm name and version), an RP/ST OBX with the SR SOP Instance UID, and an NTE
disclaimer. Every text value is escaped here (``\\ | ^ & ~``, HL7 v2.5.1 §2.7) before it is placed in a
component: hl7apy itself escapes only ``|`` and ``~``, so an ``^`` in an MRN used to split it into two
components (another patient), and an ``&`` in an order number made the message invalid.
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


_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


def esc(text: str) -> str:
    """One component's text with the HL7 delimiters escaped (the default encoding characters)."""
    for char, sequence in _ESCAPES:
        text = text.replace(char, sequence)
    return text


def xpn(dicom_name: str) -> str:
    """A DICOM person name (family^given^middle^prefix^suffix, ``=``-separated alphabetic, ideographic
    and phonetic groups) as an HL7 XPN (family^given^middle^suffix^prefix): the alphabetic group only."""
    parts = (dicom_name.split("=", 1)[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (esc(part.strip()) for part in parts)
    return "^".join((family, given, middle, suffix, prefix)).rstrip("^")


def _ts(value: datetime | None = None) -> str:
    """HL7 DTM: an aware time in UTC with its offset (``+0000``); a naive one (a DICOM study time whose
    offset the source did not give) as it is, without an offset."""
    value = value or datetime.now(UTC)
    if value.tzinfo is None:
        return value.strftime("%Y%m%d%H%M%S")
    return value.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


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
        if not str(msg.to_er7()).isascii():  # sent as UTF-8: say so (empty MSH-18 means ASCII)
            msg.msh.msh_18 = "UNICODE UTF-8"
        msg.validate()
        return str(msg.to_er7()).replace("\n", "\r")
    except HL7apyException as exc:
        raise Rejected(f"ORU failed strict validation ({type(exc).__name__})", code="oru_invalid") from None


def _body(msg: Message, r: OruInput) -> None:
    pr = msg.add_group("ORU_R01_PATIENT_RESULT")
    patient = pr.add_group("ORU_R01_PATIENT")
    patient.pid.pid_1 = "1"
    patient.pid.pid_3 = f"{esc(r.patient_id)}^^^{esc(r.patient_authority)}^MR"
    patient.pid.pid_5 = xpn(r.patient_name) or "UNKNOWN"
    oo = pr.add_group("ORU_R01_ORDER_OBSERVATION")
    oo.orc.orc_1 = "RE"
    oo.orc.orc_2 = esc(r.placer_number)
    oo.orc.orc_3 = esc(r.filler_number)
    oo.obr.obr_1 = "1"
    oo.obr.obr_2 = esc(r.placer_number)
    oo.obr.obr_3 = esc(r.filler_number)
    oo.obr.obr_4 = f"{r.service_code}^{r.service_text}^L"
    oo.obr.obr_7 = _ts(r.observed_at)
    oo.obr.obr_18 = esc(r.accession)
    oo.obr.obr_22 = _ts()
    oo.obr.obr_25 = r.status
    method = f"{esc(r.model_name)}^{esc(r.model_name)} {esc(r.model_version)}^L"
    n = 0
    for finding in r.findings:
        n += 1
        obs = oo.add_group("ORU_R01_OBSERVATION")
        obs.obx.obx_1 = str(n)
        obs.obx.obx_2 = finding.value_type
        obs.obx.obx_3 = f"{finding.code}^{finding.text}^{finding.system}"
        if finding.sub_id:
            obs.obx.obx_4 = finding.sub_id
        obs.obx.obx_5 = esc(finding.value) if finding.value_type == "ST" else finding.value
        if finding.units:
            obs.obx.obx_6 = finding.units
        obs.obx.obx_11 = r.status
        obs.obx.obx_14 = _ts(r.observed_at)
        obs.obx.obx_17 = method
    obs = oo.add_group("ORU_R01_OBSERVATION")
    obs.obx.obx_1 = str(n + 1)
    obs.obx.obx_2 = "ST"
    obs.obx.obx_3 = "SR-UID^Structured report SOP Instance UID^99MSGATE"  # the SR that carries the same result
    obs.obx.obx_5 = r.sr_sop_instance_uid
    obs.obx.obx_11 = r.status
    obs.obx.obx_17 = method
    for number, text in enumerate((DISCLAIMER, *r.notes), start=1):
        nte = oo.add_segment("NTE")
        nte.nte_1 = str(number)
        nte.nte_3 = esc(text)
