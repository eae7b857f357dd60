"""ORU^R01 v2.5.1 builder for model results, strictly validated with hl7apy before it leaves.

Segments: MSH (MSH-11 processing id as configured), PID (PID-3 with its assigning authority and identifier
type), ORC, OBR (accession in OBR-18 per IHE Radiology, placer ORC-2/OBR-2 and filler ORC-3/OBR-3 as whole
EIs: number, namespace, universal id and its type, OBR-4 the configured service, OBR-25 result status),
one OBX per finding (NM/CE/ST, UCUM units as CE, OBX-11 ``P`` until a clinician verifies, OBX-17
method = algorithm name and version), an OBX with status ``D`` for each observation an
earlier ORU for the order carried and this one does not, an ST OBX with the SR SOP Instance UID, and an
NTE disclaimer. Every segment, the last included, ends with CR. Every text value is escaped here (``\\ | ^ & ~``, HL7 v2.5.1 §2.7) before it is placed in a
component: hl7apy itself escapes only ``|`` and ``~``, so an ``^`` in an MRN used to split it into two
components (another patient), and an ``&`` in an order number made the message invalid. Control
characters go out as hexadecimal data (``\\X0D\\``): a CR or LF in a value ended its segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from msgate.errors import Rejected

DISCLAIMER = "Unverified AI output, not for diagnosis. Results require review by a qualified clinician."


@dataclass(frozen=True)
class Finding:
    code: str
    system: str
    text: str
    value_type: Literal["NM", "CE", "ST"]
    value: str
    units: str = ""  # a UCUM code (sent as CE ``code^code^UCUM``)
    sub_id: str = ""  # OBX-4: groups the values of one lesion ("1", "2", ...)


@dataclass(frozen=True)
class Retraction:
    """An observation an earlier ORU for the same order carried and this one does not (a lesion the
    new result no longer has): sent as an OBX with result status ``D`` (table 0085, "deletes the OBX
    record"), so a receiver that files values by OBX-3 + OBX-4 does not keep it as current. ``identifier``
    is OBX-3 as the earlier message encoded it."""

    identifier: str
    sub_id: str = ""


@dataclass(frozen=True)
class OruInput:
    """What the publisher knows about one result."""

    patient_id: str
    patient_authority: str  # DICOM Issuer of Patient ID (a local name or an OID)
    accession: str
    placer_number: str  # EI.1
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
    authority_universal_id: str = ""  # DICOM Issuer of Patient ID Qualifiers: Universal Entity ID
    authority_universal_type: str = ""  # and its type (ISO, DNS, URI, ...)
    retracted: tuple[Retraction, ...] = ()
    placer_authority: tuple[str, ...] = ()  # EI.2-EI.4 of the placer: namespace, universal id, its type
    filler_authority: tuple[str, ...] = ()
    patient_id_type: str = "MR"  # CX.5 (table 0203)
    processing_id: str = "P"  # MSH-11 (table 0103, optionally ^ processing mode, table 0207)
    service_system: str = "L"  # OBR-4.3


_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))
# A C0 control character (CR, LF, the MLLP frame bytes...) goes out as hexadecimal data (\X0D\, v2.5.1
# §2.7.4). hl7apy escapes the escape character of every sequence but \H\ \N\ \F\ \S\ \T\ \R\ \E\ (it wrote
# \E\X0D\E\, the literal text "\X0D\"), so esc() leaves a stand-in, one of the 32 Unicode noncharacters
# U+FDD0-U+FDEF (never interchanged), and build_oru() writes the sequence into the text hl7apy made.
_CONTROL = re.compile(r"[\x00-\x1f]")
_STAND_IN = re.compile(r"[\ufdd0-\ufdef]")
_STAND_IN_BASE = 0xFDD0


def esc(text: str) -> str:
    """One component's text with the HL7 delimiters escaped (the default encoding characters), and each
    control character as hexadecimal data (a stand-in until :func:`build_oru` writes it): a CR or LF placed
    as it is ended the segment, and the rest of the value became a bogus segment. Such text reaches the ORU
    from DICOM values and from the HL7 feed, whose ``\\X0D\\`` and ``\\.br\\`` msgate's parser reads into the
    values it stores (and reads this form back to the same value)."""
    text = _STAND_IN.sub("\ufffd", text)  # a noncharacter in the input is not text: the replacement character
    for char, sequence in _ESCAPES:
        text = text.replace(char, sequence)
    return _CONTROL.sub(lambda m: chr(_STAND_IN_BASE + ord(m.group())), text)


def _hex_data(er7: str) -> str:
    """The ER7 text with :func:`esc`'s stand-ins written as ``\\Xhh\\``."""
    return _STAND_IN.sub(lambda m: f"\\X{ord(m.group()) - _STAND_IN_BASE:02X}\\", er7)


def _width(escaped: str) -> int:
    """The length of :func:`esc`'s text as sent (a stand-in is the five characters of ``\\Xhh\\``)."""
    return len(escaped) + 4 * len(_STAND_IN.findall(escaped))


def xpn(dicom_name: str) -> str:
    """A DICOM person name (family^given^middle^prefix^suffix, ``=``-separated alphabetic, ideographic
    and phonetic groups) as an HL7 XPN (family^given^middle^suffix^prefix): the alphabetic group only."""
    parts = (dicom_name.split("=", 1)[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (esc(part.strip()) for part in parts)
    return "^".join((family, given, middle, suffix, prefix)).rstrip("^")


_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_HD_NAMESPACE_MAX = 20  # HD.1 / EI.2: an IS of at most 20 characters (v2.5.1 table of data types)
_ST_MAX = 199  # HD.2 / EI.3 (and CX.1, EI.1): an ST, as hl7apy checks it
_TYPE_MAX = 6  # HD.3 / EI.4: an ID of table 0301, at most 6 characters ("Random"; hl7apy checks none)


def _authority(name: str, universal_id: str, universal_type: str) -> tuple[str, str, str]:
    """Namespace, universal id and its type, escaped, each where it fits: lengths are those of the escaped
    text (what the receiver and hl7apy's STRICT check count; a 19-character namespace with an ``&`` is 21).
    A type longer than table 0301 allows is not one (as if none was sent). A universal id too long for
    HD.2/EI.3 is left out beside a namespace. A namespace too long for HD.1/EI.2 goes into HD.2/EI.3 as a
    local (``L``) identifier, or is left out beside a universal id. A part that fits nowhere with nothing
    beside it is kept, and strict validation refuses the message (the caller decides what that means)."""
    name, universal_id, universal_type = (esc(part.strip()) for part in (name, universal_id, universal_type))
    if _width(universal_type) > _TYPE_MAX:
        universal_type = ""
    if _width(universal_id) > _ST_MAX and name:
        universal_id, universal_type = "", ""
    if _width(name) > _HD_NAMESPACE_MAX:
        if universal_id:
            name = ""  # the universal id names the authority; a name too long for HD.1 is left out
        elif _width(name) <= _ST_MAX:
            name, universal_id, universal_type = "", name, "L"
    return name, universal_id, universal_type


def hd(name: str, universal_id: str = "", universal_type: str = "") -> str:
    """An assigning authority as HD subcomponents (``namespace&universal id&type``, escaped). An OID goes
    into HD.2 with type ISO; a name longer than HD.1 allows goes into HD.2 as a local (``L``) identifier
    instead of being cut (a cut name would no longer match the EHR's authority); lengths as
    :func:`_authority` fits them. The only authority of a patient identifier is never dropped: one that fits
    nowhere refuses the ORU (sent without it, an engine could file the result under another facility's
    patient with the same number)."""
    name, universal_id, universal_type = name.strip(), universal_id.strip(), universal_type.strip()
    if not universal_id and _OID.match(name):
        name, universal_id, universal_type = "", name, "ISO"
    name, universal_id, universal_type = _authority(name, universal_id, universal_type)
    if universal_id:
        return f"{name}&{universal_id}&{universal_type or 'L'}"
    return name


def ei(entity: str, authority: tuple[str, ...] = ()) -> str:
    """An EI (``entity^namespace^universal id^type``), escaped, without trailing empty components; the
    namespace, universal id and type placed as :func:`_authority` fits them, and a part that fits nowhere
    left out: the ORU stays valid, the number going out alone as for an order stored before revision
    0008 (PID-3 names the patient)."""
    namespace, universal_id, universal_type = _authority(*(tuple(authority) + ("", "", ""))[:3])
    if _width(universal_id) > _ST_MAX:
        universal_id, universal_type = "", ""
    if _width(namespace) > _HD_NAMESPACE_MAX:  # too long for EI.3 as well
        namespace = ""
    parts = [esc(entity), namespace, universal_id, universal_type]
    while len(parts) > 1 and not parts[-1]:
        parts.pop()
    return "^".join(parts)


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
        msg.msh.msh_11 = result.processing_id
        msg.msh.msh_12 = "2.5.1"
        msg.msh.msh_15 = "AL"
        msg.msh.msh_16 = "NE"
        _body(msg, result)
        if not _hex_data(str(msg.to_er7())).isascii():  # sent as UTF-8: say so (empty MSH-18 means ASCII)
            msg.msh.msh_18 = "UNICODE UTF-8"
        msg.validate()
        made = str(msg.to_er7())
        er7 = _hex_data(made).replace("\n", "\r") + "\r"  # every segment ends with CR (v2.5.1 §2.5)
        if _STAND_IN.search(made):  # hexadecimal data written in: validated again as it is sent
            parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()
        return er7
    except HL7apyException as exc:
        raise Rejected(f"ORU failed strict validation ({type(exc).__name__})", code="oru_invalid") from None


def _body(msg: Message, r: OruInput) -> None:
    pr = msg.add_group("ORU_R01_PATIENT_RESULT")
    patient = pr.add_group("ORU_R01_PATIENT")
    patient.pid.pid_1 = "1"
    authority = hd(r.patient_authority, r.authority_universal_id, r.authority_universal_type)
    patient.pid.pid_3 = f"{esc(r.patient_id)}^^^{authority}^{esc(r.patient_id_type or 'MR')}"
    patient.pid.pid_5 = xpn(r.patient_name) or "UNKNOWN"
    oo = pr.add_group("ORU_R01_ORDER_OBSERVATION")
    oo.orc.orc_1 = "RE"
    placer, filler = ei(r.placer_number, r.placer_authority), ei(r.filler_number, r.filler_authority)
    oo.orc.orc_2 = placer
    oo.orc.orc_3 = filler
    oo.obr.obr_1 = "1"
    oo.obr.obr_2 = placer
    oo.obr.obr_3 = filler
    oo.obr.obr_4 = f"{esc(r.service_code)}^{esc(r.service_text)}^{esc(r.service_system)}"
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
            obs.obx.obx_6 = f"{esc(finding.units)}^{esc(finding.units)}^UCUM"
        obs.obx.obx_11 = r.status
        obs.obx.obx_14 = _ts(r.observed_at)
        obs.obx.obx_17 = method
    for gone in r.retracted:
        n += 1
        obs = oo.add_group("ORU_R01_OBSERVATION")
        obs.obx.obx_1 = str(n)
        obs.obx.obx_3 = gone.identifier
        if gone.sub_id:
            obs.obx.obx_4 = gone.sub_id
        obs.obx.obx_11 = "D"
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
