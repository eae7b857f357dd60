"""EHR queries and writes used by the HL7 mapping and the operator views: patients, merges, snapshots.

Identifiers are looked up by blind index ``HMAC("mrn", f"{authority}|{value}")``, exactly as the DICOM
ingest indexes ``IssuerOfPatientID|PatientID``, so an HL7 patient and a DICOM study link without
decrypting anything. A merged patient points at its survivor (``merged_into_id``). Which identifiers
find a patient, their indexes and conflicts: :mod:`msgate.storage.patient_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, update
from sqlmodel import Session, col, select

from msgate.model.features import FEATURES
from msgate.storage.crypto import FieldCipher
from msgate.storage.models import Observation, Order, Patient, PatientIdentifier, Study, utcnow
from msgate.storage.patient_ids import (AUTHORITY_STORED, PATIENT_ID_TYPES, Identifier,
                                       IdentifierConflict, id_index, is_patient_identifier)
from msgate.storage.patient_ids import check_slots as _check_slots
from msgate.storage.patient_ids import held_index as _held_index
from msgate.storage.patient_ids import lookup as _lookup
from msgate.storage.patient_ids import slot as _slot



@dataclass
class KnownPatients:
    """What one transaction learnt about identifier indexes: the patient of each, or that none is stored.

    Filled by :func:`patients_by_index` and kept up to date by :func:`upsert_patient`; clear it after
    anything that moves identifiers between patients (a merge)."""

    ids: dict[str, int] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)
    links: list[tuple[str, int]] = field(default_factory=list)  # new identifiers whose studies wait for a patient
    loaded: list[Patient] = field(default_factory=list)  # held, so the session's (weak) identity map keeps them
    held: dict[int, list[PatientIdentifier]] = field(default_factory=dict)  # a patient's identifier rows

    def clear(self) -> None:
        self.ids.clear()
        self.absent.clear()
        self.held.clear()


def survivor(session: Session, patient: Patient) -> Patient:
    seen = set()
    while patient.merged_into_id is not None and patient.id not in seen:
        seen.add(patient.id)
        nxt = session.get(Patient, patient.merged_into_id)
        if nxt is None:
            break
        patient = nxt
    return patient


def holds_study_id(session: Session, cipher: FieldCipher, patient_id: int, study: Study) -> bool:
    """Whether the patient (or a patient merged into it) has an identifier whose value is the study's DICOM
    PatientID, whatever its assigning authority. The check before an order found by accession number alone
    gives a study its patient: accession numbers are unique per issuer only, so with two facilities (or a
    reused number) the newest order of that number belonged to someone else, and the case ran with that
    patient's EHR and went out with that patient's order numbers. A study without PatientID holds none."""
    dicom_id = (cipher.decrypt(study.patient_id_enc, column="study.patient_id") or "").strip()
    if not dicom_id:
        return False
    ids = {patient_id, *session.exec(select(Patient.id).where(Patient.merged_into_id == patient_id)).all()}
    for row in session.exec(select(PatientIdentifier).where(col(PatientIdentifier.patient_id).in_(ids))).all():
        if (cipher.decrypt(row.value_enc, column="patient_identifier.value") or "").strip() == dicom_id:
            return True
    return False


def find_patients(session: Session, cipher: FieldCipher, idents: list[Identifier]) -> list[Patient]:
    """Every (surviving) patient that the patient identifiers among ``idents`` name, in row order, each
    once."""
    indexes = list(_lookup(cipher, idents))
    if not indexes:
        return []
    out: dict[int, Patient] = {}
    for row in session.exec(select(PatientIdentifier).where(col(PatientIdentifier.id_index).in_(indexes))
                            .order_by(col(PatientIdentifier.id))).all():
        patient = session.get(Patient, row.patient_id)
        if patient is not None:
            patient = survivor(session, patient)
            out.setdefault(patient.id, patient)  # type: ignore[arg-type]
    return list(out.values())


def find_patient(session: Session, cipher: FieldCipher, idents: list[Identifier]) -> Patient | None:
    if not idents:
        return None
    indexes = [id_index(cipher, i) for i in idents]
    row = session.exec(select(PatientIdentifier).where(col(PatientIdentifier.id_index).in_(indexes))).first()
    if row is None:
        return None
    patient = session.get(Patient, row.patient_id)
    return survivor(session, patient) if patient is not None else None


INDEX_BATCH = 500  # blind indexes per IN (...) statement


def identifiers_by_value(session: Session, cipher: FieldCipher, value: str) -> list[PatientIdentifier]:
    """Patient identifier rows (MR, PI, ... as :func:`id_index` counts them) with this value under any
    assigning authority, in row order: what an operator who knows the MRN but not the CX-4 the interface
    engine sent asks for.

    The blind index keys authority and value together, and the authority is stored in clear (it names an
    issuer, not a person), so the index of ``authority|value`` is computed for each stored authority and
    those are looked up: nothing decrypted, no plaintext at rest, no new column. An authority longer than
    the column was stored cut and its index cannot be recomputed from the row; only those rows are
    decrypted and compared."""
    value = value.strip()
    if not value:
        return []
    authorities = session.exec(select(PatientIdentifier.authority).distinct()).all()
    indexes = [id_index(cipher, Identifier(value=value, authority=a)) for a in authorities]
    rows: dict[int, PatientIdentifier] = {}
    for start in range(0, len(indexes), INDEX_BATCH):
        part = indexes[start:start + INDEX_BATCH]
        rows.update((r.id, r) for r in session.exec(select(PatientIdentifier)
                                                    .where(col(PatientIdentifier.id_index).in_(part))).all()
                    if r.id is not None)
    cut = select(PatientIdentifier).where(func.length(PatientIdentifier.authority) >= AUTHORITY_STORED)
    for row in session.exec(cut).all():
        if (row.id is not None and row.id not in rows and row.id_type.strip().upper() in PATIENT_ID_TYPES
                and (cipher.decrypt(row.value_enc, column="patient_identifier.value") or "").strip() == value):
            rows[row.id] = row
    return [rows[k] for k in sorted(rows)]


def patients_by_value(session: Session, cipher: FieldCipher,
                      value: str) -> list[tuple[Patient, list[PatientIdentifier]]]:
    """The (surviving) patients that hold an identifier with this value under any assigning authority,
    each once with its matching identifier rows, in patient id order."""
    out: dict[int, tuple[Patient, list[PatientIdentifier]]] = {}
    for row in identifiers_by_value(session, cipher, value):
        patient = session.get(Patient, row.patient_id)
        if patient is None:
            continue
        patient = survivor(session, patient)
        assert patient.id is not None
        out.setdefault(patient.id, (patient, []))[1].append(row)
    return [out[k] for k in sorted(out)]


def upsert_patient(session: Session, cipher: FieldCipher, idents: list[Identifier], *, name: str | None = None,
                   birth_date: str | None = None, sex: str | None = None, clear: frozenset[str] = frozenset(),
                   update_demographics: bool = True, known: KnownPatients | None = None) -> Patient:
    """Find the patient by its patient identifiers (not :data:`NON_PATIENT_ID_TYPES`) or create one; set the
    demographics given; add the identifiers it does not hold yet (those of other types too, which never
    find it).

    Raises :class:`IdentifierConflict` before writing anything when the patient identifiers name more than
    one patient, or one new to the patient found is of a type and authority under which it holds another
    identifier that ``idents`` do not list (a second MR at the same hospital: two people, one record).

    ``clear`` names demographics to delete (``name``, ``birth_date``, ``sex``): the HL7 explicit null ``""``.

    With ``update_demographics=False`` (orders and results) an existing patient's demographics are left to
    ADT, which owns them; a new patient still gets them. ``known`` saves the lookups when it knows every
    identifier and they name at most one patient, not merged; it is kept up to date here.
    """
    lookup = _lookup(cipher, idents)
    patient, found = _find_by_index(session, list(lookup), known)
    stored = {lookup[index] for index in found}
    new: dict[str, Identifier] = {}
    for ident in idents:
        if is_patient_identifier(ident) and (index := id_index(cipher, ident)) not in stored:
            new.setdefault(index, ident)
    others = [i for i in idents if not is_patient_identifier(i)]
    created = patient is None
    if patient is not None and new:
        _check_slots(_held(session, patient, known), list(new.values()), set(lookup))
    if patient is None:
        patient = Patient()
    if created or update_demographics:
        enc = cipher.encrypt
        if name:
            patient.name_enc = enc(name, column="patient.name")
        if birth_date:
            patient.birth_date_enc = enc(birth_date, column="patient.birth_date")
        if sex:
            patient.sex_enc = enc(sex, column="patient.sex")
        for column in clear & {"name", "birth_date", "sex"}:
            setattr(patient, f"{column}_enc", None)
        patient.updated_at = utcnow()
        session.add(patient)
        session.flush()
        if created and known is not None and patient.id is not None:
            known.held[patient.id] = []
    missing = [*new.values(), *_not_held(session, cipher, patient, others, known)]
    if missing:
        _insert_identifiers(session, cipher, patient, missing, known=known)
    if known is not None and patient.id is not None:  # only what the rows say (a conflict is looked up again)
        known.ids.update({index: patient.id for index in lookup
                          if found.get(index, patient.id) == patient.id})
        known.absent.difference_update(lookup)
    return patient


def _find_by_index(session: Session, indexes: list[str],
                   known: KnownPatients | None) -> tuple[Patient | None, dict[str, int]]:
    """The (surviving) patient of these identifier indexes, and the stored ones with their rows' patient.
    Raises :class:`IdentifierConflict` when they name more than one patient."""
    if not indexes:
        return None, {}
    if known is not None and all(i in known.ids or i in known.absent for i in indexes):
        stored = {i: known.ids[i] for i in indexes if i in known.ids}
        if not stored:
            return None, {}
        if len(set(stored.values())) == 1:
            patient = session.get(Patient, next(iter(stored.values())))
            if patient is not None and patient.merged_into_id is None:
                return patient, stored
    rows = session.exec(select(PatientIdentifier).where(col(PatientIdentifier.id_index).in_(indexes))
                        .order_by(col(PatientIdentifier.id))).all()
    patients: dict[int | None, Patient] = {}
    for row in rows:
        found = session.get(Patient, row.patient_id)
        if found is not None:
            found = survivor(session, found)
            patients.setdefault(found.id, found)
    if len(patients) > 1:
        raise IdentifierConflict()
    return next(iter(patients.values()), None), {r.id_index: r.patient_id for r in rows}


def _held(session: Session, patient: Patient, known: KnownPatients | None) -> list[PatientIdentifier]:
    """The patient's identifier rows (remembered in ``known`` for the rest of the transaction)."""
    assert patient.id is not None
    if known is not None and patient.id in known.held:
        return known.held[patient.id]
    rows = list(session.exec(select(PatientIdentifier).where(PatientIdentifier.patient_id == patient.id)
                             .order_by(col(PatientIdentifier.id))).all())
    if known is not None:
        known.held[patient.id] = rows
    return rows


def _not_held(session: Session, cipher: FieldCipher, patient: Patient, others: list[Identifier],
              known: KnownPatients | None) -> list[Identifier]:
    """The identifiers of other types among ``others`` that the patient does not hold yet, each once. A row
    is recognised by its index (:func:`_held_index`, or :func:`id_index` for rows stored before), else, for
    one that came with a merged patient, by its decrypted value."""
    if not others:
        return []
    assert patient.id is not None
    rows = _held(session, patient, known)
    out: dict[tuple[str, str, str], Identifier] = {}
    for ident in others:
        slot = _slot(ident.id_type, ident.authority)
        same = [r for r in rows if _slot(r.id_type, r.authority) == slot]
        indexes = {id_index(cipher, ident), _held_index(cipher, ident, patient.id)}
        if any(r.id_index in indexes for r in same) or any(
                (cipher.decrypt(r.value_enc, column="patient_identifier.value") or "") == ident.value
                for r in same):
            continue
        out.setdefault((*slot, ident.value), ident)
    return list(out.values())


def patients_by_index(session: Session, cipher: FieldCipher, idents: list[Identifier]) -> KnownPatients:
    """What is stored for the patient identifiers among ``idents``, in one query (the patients are loaded
    into the session too; with identifiers of other types in ``idents``, their identifier rows as well)."""
    indexes = list(_lookup(cipher, idents))
    if not indexes:
        return KnownPatients()
    pairs = dict(session.execute(select(PatientIdentifier.id_index, PatientIdentifier.patient_id)
                                 .where(col(PatientIdentifier.id_index).in_(indexes))).all())
    ids = set(pairs.values())
    loaded = list(session.exec(select(Patient).where(col(Patient.id).in_(ids))).all()) if ids else []
    known = KnownPatients(ids=pairs, absent=set(indexes) - set(pairs), loaded=loaded)
    if ids and not all(is_patient_identifier(i) for i in idents):
        known.held = {pid: [] for pid in ids}
        for row in session.exec(select(PatientIdentifier).where(col(PatientIdentifier.patient_id).in_(ids))
                                .order_by(col(PatientIdentifier.id))).all():
            known.held[row.patient_id].append(row)
    return known


def _insert_identifiers(session: Session, cipher: FieldCipher, patient: Patient, idents: list[Identifier], *,
                        known: KnownPatients | None = None) -> None:
    """Add identifiers; DICOM studies filed under the patient identifiers get the patient now, or at
    :func:`link_studies`."""
    assert patient.id is not None
    rows, links = [], []
    for ident in idents:
        linked = is_patient_identifier(ident)
        index = id_index(cipher, ident) if linked else _held_index(cipher, ident, patient.id)
        rows.append(PatientIdentifier(patient_id=patient.id, id_index=index,
                                      authority=ident.authority[:AUTHORITY_STORED], id_type=ident.id_type[:16] or "MR",
                                      value_enc=cipher.encrypt(ident.value, column="patient_identifier.value")))
        if linked:
            links.append((index, patient.id))
    session.add_all(rows)
    session.flush()
    if known is not None:
        known.links.extend(links)
        if patient.id in known.held:
            known.held[patient.id].extend(rows)
    elif links:
        _link(session, links)


def link_studies(session: Session, known: KnownPatients) -> None:
    """Studies filed under identifiers added with ``known``: give them their patient (one statement)."""
    if known.links:
        links, known.links = known.links, []
        _link(session, links)


def _link(session: Session, links: list[tuple[str, int]]) -> None:
    table = Study.__table__  # type: ignore[attr-defined]
    result = session.execute(update(table).where(table.c.dicom_patient_index == bindparam("ix"),
                                                 table.c.patient_id.is_(None)).values(patient_id=bindparam("pid")),
                             [{"ix": index, "pid": pid} for index, pid in links])
    if result.rowcount:  # Core bypasses the session: let loaded studies read their new patient
        for obj in list(session.identity_map.values()):
            if isinstance(obj, Study):
                session.expire(obj, ["patient_id"])


def add_identifiers(session: Session, cipher: FieldCipher, patient: Patient, idents: list[Identifier]) -> None:
    """Point these patient identifiers at ``patient`` (creating the missing ones), e.g. after a merge; those
    of other types are added to it where it does not hold them (they never move between patients)."""
    assert patient.id is not None
    missing: dict[str, Identifier] = {}
    for ident in idents:
        if not is_patient_identifier(ident):
            continue
        existing = session.exec(select(PatientIdentifier).where(col(PatientIdentifier.id_index).in_(
            list(_lookup(cipher, [ident])))).order_by(col(PatientIdentifier.id))).first()
        if existing is None:
            missing.setdefault(id_index(cipher, ident), ident)
        elif existing.patient_id != patient.id:
            existing.patient_id = patient.id
            session.add(existing)
    others = _not_held(session, cipher, patient, [i for i in idents if not is_patient_identifier(i)], None)
    if missing or others:
        _insert_identifiers(session, cipher, patient, [*missing.values(), *others])


def replace_identifiers(session: Session, cipher: FieldCipher, patient: Patient, *, old: list[Identifier],
                        new: list[Identifier]) -> int:
    """ADT^A47: the patient identifiers ``old`` (MRG-1) of ``patient`` are replaced by ``new`` (PID-3): its
    rows of ``old`` that ``new`` does not name again are deleted, then ``new`` is added
    (:func:`add_identifiers`). Returns how many rows were deleted. The caller has made sure that ``new``
    names no other patient (that is a merge)."""
    indexes = list(_lookup(cipher, old))
    keep = set(_lookup(cipher, new))
    rows = session.exec(select(PatientIdentifier).where(col(PatientIdentifier.id_index).in_(indexes),
                                                        PatientIdentifier.patient_id == patient.id)).all()
    gone = [row for row in rows if row.id_index not in keep]
    for row in gone:
        session.delete(row)
    session.flush()
    add_identifiers(session, cipher, patient, new)
    return len(gone)


def merge(session: Session, *, survivor_patient: Patient, retired: Patient) -> None:
    """ADT^A40: move the retired patient's identifiers, orders, observations and studies to the survivor."""
    if retired.id == survivor_patient.id:
        return
    sid, rid = survivor_patient.id, retired.id
    for table, column in ((PatientIdentifier, PatientIdentifier.patient_id), (Order, Order.patient_id),
                          (Observation, Observation.patient_id), (Study, Study.patient_id)):
        session.execute(update(table).where(col(column) == rid).values(patient_id=sid))
    retired.merged_into_id = sid
    retired.updated_at = survivor_patient.updated_at = utcnow()  # the survivor's cases are planned again
    session.add(retired)
    session.add(survivor_patient)


# In years, it grows between the observation and the study. (Disease duration is used as recorded: the
# synthetic cohort, and so the shipped model, records it as of the scan date.)
AGEING = frozenset({"age"})


def _age(birth: str, at: date) -> float | None:
    try:
        born = date(int(birth[:4]), int(birth[4:6] or 1), int(birth[6:8] or 1))
    except ValueError:
        return None
    return round((at - born).days / 365.25, 2)


def snapshot(session: Session, cipher: FieldCipher, patient: Patient, at: datetime) -> dict[str, Any]:
    """The EHR feature values the model would get for ``patient`` at ``at`` (None: missing/expired)."""
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    out: dict[str, Any] = {}
    for spec in FEATURES:
        out[spec.name] = None
        since = at - timedelta(days=spec.validity_days)
        row = session.exec(select(Observation).where(
            Observation.patient_id == patient.id, Observation.feature == spec.name,
            col(Observation.withdrawn).is_(False), col(Observation.observed_at) <= at,
            col(Observation.observed_at) >= since).order_by(col(Observation.observed_at).desc())).first()
        if row is not None:
            raw = cipher.decrypt(row.value_enc, column="observation.value")
            value: Any = raw
            if spec.kind == "numeric" and raw is not None:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
            if spec.name in AGEING and isinstance(value, float):  # as old as it is at the study, not when noted
                value = round(value + (at - row.observed_at).days / 365.25, 2)
            out[spec.name] = {"value": value, "unit": row.unit, "observed_at": row.observed_at, "status": row.status,
                              "source": f"observation:{row.id}"}
    birth = cipher.decrypt(patient.birth_date_enc, column="patient.birth_date")
    age = _age(birth, at.date()) if birth else None
    if age:  # the birth date gives the age at the study exactly; an age observation only without one
        out["age"] = {"value": age, "unit": "a", "observed_at": None, "status": "", "source": "PID-7"}
    sex = cipher.decrypt(patient.sex_enc, column="patient.sex")
    if out.get("sex") is None and sex in ("F", "M"):
        out["sex"] = {"value": sex, "unit": "", "observed_at": None, "status": "", "source": "PID-8"}
    return out
