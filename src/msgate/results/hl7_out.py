"""The ORU^R01 side of a result: findings from the same ModelResult and codes as the SR, order numbers
from the EHR model, built and strictly validated by :mod:`msgate.hl7.oru`.

MSH-10 is a placeholder here; the outbox writes the entry's control id into MSH-10 (:func:`with_control_id`)
and records it on the attempt row: the same id for a resend after no answer (the engine may have filed the
first copy), a new one only after an explicit negative answer (AE/AR/CE/CR).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

from pydicom.dataset import Dataset
from sqlmodel import Session

from msgate.config import Settings
from msgate.hl7.oru import Finding, OruInput, Retraction, build_oru
from msgate.model.types import ModelResult
from msgate.results import codes
from msgate.results.identity import HE_PARAMETER
from msgate.results.notes import flag_notes
from msgate.storage.crypto import FieldCipher
from msgate.storage.models import Order, Study

PLACEHOLDER_CONTROL_ID = "MSGATE-UNSENT"


@dataclass(frozen=True)
class OrderNumbers:
    placer: str
    filler: str
    accession: str


def _cwe(concept: codes.CodedConcept) -> str:
    return f"{concept.value}^{concept.meaning}^{concept.scheme_designator}"


def _nm(concept: codes.CodedConcept, value: float, units: str = "1", digits: int = 4) -> Finding:
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
    return Finding(concept.value, concept.scheme_designator, concept.meaning, "NM", text or "0", units)


def findings(result: ModelResult) -> tuple[Finding, ...]:
    """One OBX per image-level finding of the SR, same codes."""
    klass = codes.EDSS_CLASS_VALUES[result.edss_class]
    dx = codes.MULTIPLE_SCLEROSIS if result.diagnosis == "MS" else codes.SMALL_VESSEL_DISEASE
    out = [
        Finding(codes.EDSS_CLASS.value, codes.SCHEME, codes.EDSS_CLASS.meaning, "CE", _cwe(klass)),
        _nm(codes.EDSS_ESTIMATE, float(result.edss_estimate), "{score}", 1),
        *(_nm(code, float(p)) for code, p in zip(codes.EDSS_CLASS_PROBABILITY, result.edss_probabilities, strict=True)),
        _nm(codes.CONFIDENCE, float(result.confidence)),
        _nm(codes.UNCERTAINTY, float(result.uncertainty)),
        Finding(codes.DIAGNOSIS.value, codes.SCHEME, codes.DIAGNOSIS.meaning, "CE", _cwe(dx)),
        _nm(codes.P_MS, float(result.p_ms)),
        _nm(codes.LESION_COUNT, len(result.lesions), "{lesions}"),
        _nm(codes.LESION_VOLUME_TOTAL, float(result.lesion_volume_ml), "mL", 3),
    ]
    if result.rim_count is not None:
        out.append(_nm(codes.RIM_COUNT, result.rim_count, "{lesions}"))
    return tuple(out) + lesion_findings(result)


def lesion_findings(result: ModelResult) -> tuple[Finding, ...]:
    """Per lesion, grouped by OBX-4 sub-id (the SEG's lesion label): location, volume, Rim+ probability."""
    out: list[Finding] = []
    for lesion in result.lesions:
        sub = str(lesion.label)
        location = codes.LOCATION.get(lesion.location)
        if location is not None:
            out.append(Finding(codes.LESION_LOCATION.value, codes.SCHEME, codes.LESION_LOCATION.meaning, "CE",
                               _cwe(location), sub_id=sub))
        out.append(replace(_nm(codes.LESION_VOLUME, float(lesion.volume_ml), "mL", 4), sub_id=sub))
        if lesion.rim_probability is not None:
            out.append(replace(_nm(codes.RIM_PROBABILITY, float(lesion.rim_probability)), sub_id=sub))
    return tuple(out)


def order_numbers(session: Session, cipher: FieldCipher, *, study: Study, source: Dataset,
                  order_id: int | None = None) -> OrderNumbers:
    """Placer/filler of the order the job was linked to (``job.flags["order_id"]``, the order of this
    patient that shares the study's accession, chosen by ``workers.ehr.link``); without one, the same
    choice made now. Never another patient's order with the same accession (counters restart, several
    facilities): the EHR would file the result against that patient. The accession from the images."""
    from msgate.workers.ehr import link  # the worker's rule, so the ORU names the order the model used

    accession = str(source.get("AccessionNumber", "") or "")
    order = session.get(Order, order_id) if order_id is not None else None
    if order is None:
        linked = link(session, study, cipher).order_id
        order = session.get(Order, linked) if linked is not None else None
    placer = cipher.decrypt(order.placer_enc, column="order.placer") if order and order.placer_enc else None
    filler = cipher.decrypt(order.filler_enc, column="order.filler") if order and order.filler_enc else None
    return OrderNumbers(placer or accession, filler or accession, accession)


def retractions(previous_oru: str, current: tuple[Finding, ...]) -> tuple[Retraction, ...]:
    """The observations (OBX-3 code + OBX-4 sub-id) the earlier ORU for this order sent as current and
    ``current`` no longer has: a lesion that is gone, a Rim+ count without QSM now."""
    keep = {(f.code, f.sub_id) for f in current} | {("SR-UID", "")}
    out, seen = [], set()
    for line in previous_oru.replace("\n", "\r").split("\r"):
        fields = line.split("|")
        if not line.startswith("OBX") or len(fields) < 12 or fields[11] == "D":
            continue
        code, sub = fields[3].split("^")[0], fields[4]
        if (code, sub) not in keep and (code, sub) not in seen:
            seen.add((code, sub))
            out.append(Retraction(fields[3], sub))
    return tuple(out)


# A correction of unverified AI output stays preliminary (table 0085: C and F are for verified results;
# reference/domain.md: OBX-11 P until a clinician verifies). The same order numbers let the EHR replace
# the earlier values; this note says so to whoever reads it.
CORRECTION = "Correction: replaces the AI result sent earlier for this order (still unverified)."


def exam_time(source: Dataset) -> datetime | None:
    """When the exam was done (OBR-7, OBX-14): StudyDate + StudyTime of the source, local time unless
    the source gives TimezoneOffsetFromUTC; None (the publish time) without a study date."""
    date = str(source.get("StudyDate", "") or "").strip()
    if len(date) != 8 or not date.isdigit():
        return None
    clock = (str(source.get("StudyTime", "") or "").split(".")[0].strip() + "000000")[:6]
    try:
        when = datetime.strptime(date + (clock if clock.isdigit() else "000000"), "%Y%m%d%H%M%S")
    except ValueError:
        return None
    offset = str(source.get("TimezoneOffsetFromUTC", "") or "").strip()
    if len(offset) == 5 and offset[0] in "+-" and offset[1:].isdigit():
        minutes = int(offset[1:3]) * 60 + int(offset[3:])
        when = when.replace(tzinfo=timezone(timedelta(minutes=minutes if offset[0] == "+" else -minutes)))
    return when


def render_oru(result: ModelResult, *, source: Dataset, numbers: OrderNumbers, sr_uid: str, correction: bool,
               settings: Settings, previous_oru: str | None = None) -> str:
    """``previous_oru``: the ORU the EHR last received for this order (a correction retracts what it
    carried and this result does not)."""
    dest = settings.hl7_out
    name = source.get("PatientName")
    qualifiers = (source.get("IssuerOfPatientIDQualifiersSequence") or [None])[0]
    found = findings(result)
    return build_oru(OruInput(
        patient_id=str(source.get("PatientID", "") or ""), patient_authority=str(source.get("IssuerOfPatientID", "") or ""),
        authority_universal_id=str(qualifiers.get("UniversalEntityID", "") or "") if qualifiers else "",
        authority_universal_type=str(qualifiers.get("UniversalEntityIDType", "") or "") if qualifiers else "",
        retracted=retractions(previous_oru, found) if previous_oru else (),
        accession=numbers.accession, placer_number=numbers.placer, filler_number=numbers.filler,
        sr_sop_instance_uid=sr_uid, model_name=result.model_name, model_version=result.model_version,
        control_id=PLACEHOLDER_CONTROL_ID, findings=found, status="P",
        notes=((CORRECTION,) if correction else ()) + ((HE_PARAMETER,) if "he" in result.flags else ())
        + flag_notes(result),
        patient_name=str(name) if name else "", observed_at=exam_time(source),
        sending_application=settings.hl7.sending_application, sending_facility=settings.hl7.sending_facility,
        receiving_application=dest.receiving_application if dest else "EHR",
        receiving_facility=dest.receiving_facility if dest else "HOSPITAL",
    ))


def _subject(oru: str) -> tuple[str, str, str]:
    """(PID-3 first identifier with its authority, ORC-2 placer, ORC-3 filler) of an ORU we built."""
    fields = {line[:3]: line.split("|") for line in oru.replace("\n", "\r").split("\r") if len(line) > 3}
    pid, orc = fields.get("PID", []), fields.get("ORC", [])
    ident = pid[3].split("~")[0].split("^") if len(pid) > 3 else [""]
    return (f"{ident[0]}^{ident[3] if len(ident) > 3 else ''}", orc[2] if len(orc) > 2 else "",
            orc[3] if len(orc) > 3 else "")


def moved(previous_oru: str, current_oru: str) -> bool:
    """Whether the earlier result went to another patient or order than this one: the study was
    re-identified (a worklist correction re-sent by the PACS) after its result was delivered."""
    return _subject(previous_oru) != _subject(current_oru)


def wrong_patient_retraction(previous_oru: str, now: str) -> str:
    """The earlier ORU sent again with every observation's OBX-11 ``W`` (table 0085: "post original as
    wrong, e.g. transmitted for wrong patient") and OBR-25 ``C``, MSH-7 now, and a note: the EHR of the
    patient (and order) it named withdraws it. Without it that patient's chart kept a result computed from
    another patient's images, and the new patient got a "correction" of values never sent to them."""
    out = []
    for line in previous_oru.replace("\n", "\r").split("\r"):
        fields = line.split("|")
        if line.startswith("MSH") and len(fields) > 6:
            fields[6] = now
        elif line.startswith("OBR") and len(fields) > 25:
            fields[25] = "C"
        elif line.startswith("OBX") and len(fields) > 11:
            fields[11] = "W"
        out.append("|".join(fields))
        if line.startswith("OBR"):
            out.append(f"NTE|1|L|{WRONG_SUBJECT}")
    return "\r".join(x for x in out if x) + "\r"


WRONG_SUBJECT = ("Withdrawn: this AI result was sent for the wrong patient or order (the study was corrected "
                 "and sent again); disregard it")


def with_control_id(message: bytes, control_id: str) -> bytes:
    """The same ER7 message with MSH-10 replaced (the field separator is read from MSH-1)."""
    head, sep, rest = message.partition(b"\r")
    if not head.startswith(b"MSH") or len(head) < 4:
        raise ValueError('Argument "message" does not start with an MSH segment')
    fs = head[3:4]
    parts = head.split(fs)
    parts[9] = control_id.encode("ascii")
    return fs.join(parts) + sep + rest
