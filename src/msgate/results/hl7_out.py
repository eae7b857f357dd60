"""The ORU^R01 side of a result: findings from the same ModelResult and codes as the SR, order numbers
from the EHR model, built and strictly validated by :mod:`msgate.hl7.oru`.

MSH-10 is a placeholder here; the outbox writes the entry's control id into MSH-10 (:func:`with_control_id`)
and records it on the attempt row: the same id for a resend after no answer (the engine may have filed the
first copy), a new one only after an explicit negative answer (AE/AR/CE/CR).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from pydicom.dataset import Dataset
from sqlmodel import Session, col, select

from msgate.config import Hl7Destination, Settings
from msgate.hl7.oru import Finding, OruInput, Retraction, build_oru
from msgate.model.types import ModelResult
from msgate.results import codes
from msgate.results.identity import HE_PARAMETER
from msgate.results.notes import flag_notes
from msgate.storage import repo_ehr
from msgate.storage.crypto import FieldCipher
from msgate.storage.models import Order, Patient, PatientIdentifier, Study

PLACEHOLDER_CONTROL_ID = "MSGATE-UNSENT"


@dataclass(frozen=True)
class LinkedId:
    """The identifier of the EHR patient the study is linked to, as the HL7 feed stored it (PID-3)."""

    value: str
    authority: str  # CX.4 as stored (its namespace, or its universal id when the feed sent only that)
    id_type: str = "MR"  # CX.5


@dataclass(frozen=True)
class Subject:
    """The EHR patient and order an ORU named, by row id (internal ids, never PHI): the order the numbers
    came from and its patient, else the patient the study was linked to. None where there was none (the
    ORU then named them by the images' identifiers alone)."""

    patient: int | None = None
    order: int | None = None

    def as_flags(self) -> dict[str, int | None]:
        """What ``job.flags["oru_subject"]`` records for a later run's :func:`moved`."""
        return {"patient": self.patient, "order": self.order}


@dataclass(frozen=True)
class OrderNumbers:
    """Whom and which order the ORU names: placer and filler (EI.1, and EI.2-EI.4 as the order feed sent
    them), the accession, and the linked patient's identifier (None: PID-3 from the images)."""

    placer: str
    filler: str
    accession: str
    placer_authority: tuple[str, ...] = ()
    filler_authority: tuple[str, ...] = ()
    patient: LinkedId | None = None
    subject: Subject = Subject()  # the EHR rows it names, for :func:`moved`


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
    facilities): the EHR would file the result against that patient. The accession from the images.
    The patient: the order's (the images' own, as the link chose it), else the study's linked patient."""
    from msgate.workers.ehr import EhrLink, link  # the worker's rule: the ORU names the order the model used

    accession = str(source.get("AccessionNumber", "") or "")
    order = session.get(Order, order_id) if order_id is not None else None
    linked: EhrLink | None = None
    if order is None:
        linked = link(session, study, cipher)
        order = session.get(Order, linked.order_id) if linked.order_id is not None else None
    owner = order.patient_id if order is not None and order.patient_id is not None else None
    if owner is None:
        owner = (linked or link(session, study, cipher)).patient_id
    patient = _linked_id(session, cipher, study, owner, str(source.get("PatientID", "") or "").strip())
    placer = cipher.decrypt(order.placer_enc, column="order.placer") if order and order.placer_enc else None
    filler = cipher.decrypt(order.filler_enc, column="order.filler") if order and order.filler_enc else None
    return OrderNumbers(placer or accession, filler or accession, accession,
                        _authority(cipher, order.placer_authority_enc, "placer") if order and placer else (),
                        _authority(cipher, order.filler_authority_enc, "filler") if order and filler else (),
                        patient, Subject(owner, order.id if order is not None else None))


def _authority(cipher: FieldCipher, token: bytes | None, scope: str) -> tuple[str, ...]:
    """EI.2-EI.4 stored with an order number (``hl7.mapping``); () for an order stored before revision 0008
    (and for a value that does not decode as the list the mapping writes)."""
    raw = cipher.decrypt(token, column=f"order.{scope}_authority") if token else None
    try:
        parts = json.loads(raw) if raw else []
    except ValueError:
        return ()
    return tuple(str(p) for p in parts[:3]) if isinstance(parts, list) else ()


def _linked_id(session: Session, cipher: FieldCipher, study: Study, patient_id: int | None,
               dicom_id: str) -> LinkedId | None:
    """The patient's identifier that links it to the study: the one the study's DICOM identifier is indexed
    under (``IssuerOfPatientID`` or ``dicom.default_issuer`` with PatientID), else a patient identifier
    (MR first) whose value is the images' PatientID, under whatever authority the feed sent (the link made
    through the accession's order). None when the patient has neither, or its authority was stored cut
    (``repo_ehr.AUTHORITY_STORED``): PID-3 then comes from the images."""
    patient = session.get(Patient, patient_id) if patient_id is not None else None
    if patient is None:
        return None
    patient = repo_ehr.survivor(session, patient)
    query = select(PatientIdentifier).where(PatientIdentifier.patient_id == patient.id)
    rows = [(r, (cipher.decrypt(r.value_enc, column="patient_identifier.value") or "").strip())
            for r in session.exec(query.order_by(col(PatientIdentifier.id))).all()
            if len(r.authority) < repo_ehr.AUTHORITY_STORED]
    exact = [(r, v) for r, v in rows if study.dicom_patient_index and r.id_index == study.dicom_patient_index]
    by_value = sorted(((r, v) for r, v in rows if dicom_id and v == dicom_id
                       and _id_type(r.id_type) in repo_ehr.PATIENT_ID_TYPES),
                      key=lambda pair: _id_type(pair[0].id_type) != "MR")
    return next((LinkedId(v, r.authority, _id_type(r.id_type)) for r, v in exact + by_value if v), None)


def _id_type(stored: str) -> str:
    """CX.5 of a stored identifier type: ``MR`` when none was sent (or ``MRN``, not a table 0203 code)."""
    kind = stored.strip().upper()
    return "MR" if kind in ("", "MRN") else kind


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
    dest = settings.hl7_out or Hl7Destination()
    name = source.get("PatientName")
    found = findings(result)
    return build_oru(OruInput(
        **_pid3(source, numbers.patient, settings.dicom.default_issuer),
        retracted=retractions(previous_oru, found) if previous_oru else (),
        accession=numbers.accession, placer_number=numbers.placer, filler_number=numbers.filler,
        placer_authority=numbers.placer_authority, filler_authority=numbers.filler_authority,
        sr_sop_instance_uid=sr_uid, model_name=result.model_name, model_version=result.model_version,
        control_id=PLACEHOLDER_CONTROL_ID, findings=found, status="P",
        notes=((CORRECTION,) if correction else ()) + ((HE_PARAMETER,) if "he" in result.flags else ())
        + flag_notes(result),
        patient_name=str(name) if name else "", observed_at=exam_time(source),
        sending_application=settings.hl7.sending_application, sending_facility=settings.hl7.sending_facility,
        receiving_application=dest.receiving_application, receiving_facility=dest.receiving_facility,
        processing_id=dest.processing_id, service_code=dest.service_code, service_text=dest.service_text,
        service_system=dest.service_coding_system,
    ))


def _pid3(source: Dataset, linked: LinkedId | None, default_issuer: str) -> dict[str, str]:
    """PID-3's parts: the linked EHR patient's identifier as stored; without one, the images' PatientID
    with IssuerOfPatientID (and its qualifiers), or ``dicom.default_issuer`` when the images name no issuer
    (the authority the study was indexed and linked under)."""
    if linked is not None:
        return {"patient_id": linked.value, "patient_authority": linked.authority,
                "patient_id_type": linked.id_type}
    qualifiers = (source.get("IssuerOfPatientIDQualifiersSequence") or [None])[0]
    issuer = str(source.get("IssuerOfPatientID", "") or "").strip()
    universal_id = str(qualifiers.get("UniversalEntityID", "") or "") if qualifiers else ""
    universal_type = str(qualifiers.get("UniversalEntityIDType", "") or "") if qualifiers else ""
    return {"patient_id": str(source.get("PatientID", "") or ""),
            "patient_authority": issuer or ("" if universal_id.strip() else default_issuer.strip()),
            "authority_universal_id": universal_id, "authority_universal_type": universal_type}


def _subject(oru: str) -> tuple[tuple[str, list[str]], tuple[str, list[str]], tuple[str, list[str]]]:
    """(PID-3 first identifier, ORC-2 placer, ORC-3 filler) of an ORU we built, each as (the number, what
    qualifies it: CX.4's HD parts, EI.2-EI.4; escaped text, so ``&`` and ``^`` are the delimiters)."""
    fields = {line[:3]: line.split("|") for line in oru.replace("\n", "\r").split("\r") if len(line) > 3}
    pid, orc = fields.get("PID", []), fields.get("ORC", [])
    ident = pid[3].split("~")[0].split("^") if len(pid) > 3 else [""]
    placer, filler = (orc[n].split("^") if len(orc) > n else [""] for n in (2, 3))
    return ((ident[0], ident[3].split("&") if len(ident) > 3 else []), (placer[0], placer[1:4]),
            (filler[0], filler[1:4]))


def _authority_differs(a: list[str], b: list[str]) -> bool:
    """Whether two assigning authorities (HD: namespace, universal id, its type; or EI.2-EI.4) name
    different ones: a namespace against a namespace, a universal id against one of the same type (an OID
    and a local name are not compared). A part only one side has says nothing: an ORU built from the
    images' IssuerOfPatientID and its qualifiers says ``HOSP&1.2.3.4&ISO``, one that names the linked EHR
    identifier ``HOSP`` (the feed's HD.1, stored alone), and they are the same patient."""
    (ns_a, uid_a, type_a), (ns_b, uid_b, type_b) = ((parts + ["", "", ""])[:3] for parts in (a, b))
    if ns_a and ns_b and ns_a != ns_b:
        return True
    return bool(uid_a and uid_b and uid_a != uid_b and (type_a or "L").upper() == (type_b or "L").upper())


def job_subject(session: Session, flags: dict[str, Any]) -> Subject:
    """The EHR patient and order a job's ORU named: ``flags["oru_subject"]`` as the publish recorded it,
    else (a job published before it was recorded) the link it was planned with (``patient_id``,
    ``order_id``); a merged patient as its survivor."""
    named = flags.get("oru_subject")
    if not isinstance(named, dict):
        named = {"patient": flags.get("patient_id"), "order": flags.get("order_id")}
    patient_id, order_id = named.get("patient"), named.get("order")
    patient = session.get(Patient, patient_id) if isinstance(patient_id, int) else None
    if patient is not None:
        patient_id = repo_ehr.survivor(session, patient).id
    return Subject(patient_id if isinstance(patient_id, int) else None,
                   order_id if isinstance(order_id, int) else None)


def moved(previous_oru: str, current_oru: str, previous: Subject = Subject(),
          current: Subject = Subject()) -> bool:
    """Whether the earlier result went to another patient or order than this one: the study was
    re-identified (a worklist correction re-sent by the PACS) after its result was delivered.

    Decided by identity where both runs know it (``previous`` and ``current``, :func:`job_subject`: the
    EHR patient, merged ones as their survivor, and the order), not by how the ORU wrote it: an ORU sent
    before the study was linked to its EHR patient names the images' identifier and authority, and the
    correction the EHR's. Where either does not, by the numbers (PID-3.1, ORC-2.1, ORC-3.1) and their
    authority or namespace part by part (:func:`_authority_differs`): an ORU sent before msgate sent them
    (or before the study was linked to its patient) names the same patient and order by the same numbers."""
    (pid_a, *orders_a), (pid_b, *orders_b) = _subject(previous_oru), _subject(current_oru)
    if previous.patient is not None and current.patient is not None:
        patient_moved = previous.patient != current.patient
    else:
        patient_moved = pid_a[0] != pid_b[0] or _authority_differs(pid_a[1], pid_b[1])
    if previous.order is not None and current.order is not None:
        order_moved = previous.order != current.order
    else:
        order_moved = any(a[0] != b[0] or _authority_differs(a[1], b[1])
                          for a, b in zip(orders_a, orders_b, strict=True))
    return patient_moved or order_moved


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
