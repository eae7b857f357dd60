"""Patient identifiers as the HL7 feed and the DICOM ingest name patients: which CX-5 types may find a
patient, their blind indexes (``HMAC("mrn", f"{authority}|{value}")``, as the DICOM ingest indexes
``IssuerOfPatientID|PatientID``), and when a message's identifiers conflict with what a patient holds.
:mod:`msgate.storage.repo_ehr` finds, creates and merges patients with them."""

from __future__ import annotations

from dataclasses import dataclass

from msgate.errors import Rejected
from msgate.storage.crypto import FieldCipher
from msgate.storage.models import PatientIdentifier

AUTHORITY_STORED = 64  # PatientIdentifier.authority keeps this many characters; the index keys the whole one


class IdentifierConflict(Rejected):
    """A message's patient identifiers name two patients, or would give the patient found a second
    identifier of one type under an authority it holds another one of: nothing of it is written."""

    code = "identifier_conflict"

    def __init__(self) -> None:
        super().__init__(self.code)


@dataclass(frozen=True)
class Identifier:
    value: str
    authority: str = ""
    id_type: str = "MR"


PATIENT_ID_TYPES = frozenset({"", "MR", "MRN", "MRT", "PI", "PT", "PE", "PN"})
"""The identifier types (CX-5, HL7 v2.5.1 table 0203) indexed by authority and value alone, as DICOM's
IssuerOfPatientID|PatientID link them: medical record number MR (MRN, as engines often send it; an empty
CX-5 is read as MR), temporary MRT, patient internal PI and external PT, living subject enterprise number
PE, person number PN. Other types are indexed with their type too (account 2002 is not MRN 2002)."""

NON_PATIENT_ID_TYPES = frozenset({
    "SS", "SSN", "DL", "PPN", "VS",  # social security, driver's licence, passport, visa: shared placeholders
    "AN", "ANC", "AND", "ANT", "VN", "BA", "BC", "PEN", "TAX",  # accounts, visits, bank and pension numbers
    "GI", "GN", "SN", "MB", "MA", "MC", "MCD", "MCN", "WC", "WCN",  # guarantor, insurance
    "EI", "EN", "DN", "DEA", "NPI", "NP", "PRN", "MD", "LN", "SL", "UPIN", "RI", "XX", "FI", "CC", "GL",  # staff, orgs
})
"""The identifier types that never find a patient: they are stored for the patient they came with (per
patient, so two people may hold the same placeholder SSN) and never used to find one or to conflict. Every
other type finds its patient: the patient types above, and also national or jurisdictional person numbers
(NI, NNxxx, JHN, and NH as the NHS sends the NHS number: the only identifier some regions send) and local
codes (an Australian feed's ``A``)."""

_RETYPED = frozenset({"MRT", "PE"})  # rows stored before these were patient types carry the other-type index


def is_patient_identifier(ident: Identifier) -> bool:
    """Whether ``ident`` may find a patient (any type but :data:`NON_PATIENT_ID_TYPES`)."""
    return ident.id_type.strip().upper() not in NON_PATIENT_ID_TYPES


def id_index(cipher: FieldCipher, ident: Identifier) -> str:
    """Patient identifiers (:data:`PATIENT_ID_TYPES`) by authority and value, as DICOM's Issuer/PatientID
    link them; any other type also by its type (the index its rows had before :func:`held_index`)."""
    id_type = ident.id_type.strip().upper()
    suffix = "" if id_type in PATIENT_ID_TYPES else f"|{id_type}"
    return cipher.blind_index(f"{ident.authority}|{ident.value}{suffix}", scope="mrn")


def held_index(cipher: FieldCipher, ident: Identifier, patient_id: int) -> str:
    """A row's index for an identifier of another type: per patient, so two patients may each hold the same
    SSN (``id_index`` is unique), and no lookup by value can find either of them through it."""
    key = f"{ident.authority}|{ident.value}|{ident.id_type.strip().upper()}|{patient_id}"
    return cipher.blind_index(key, scope="mrn_held")


def lookup(cipher: FieldCipher, idents: list[Identifier]) -> dict[str, str]:
    """The indexes that find the patient of ``idents``, each mapped to its identifier's :func:`id_index`:
    those of the patient identifiers, and for MRT/PE also the index rows stored before had."""
    out: dict[str, str] = {}
    for ident in idents:
        if is_patient_identifier(ident):
            index = id_index(cipher, ident)
            out[index] = index
            if ident.id_type.strip().upper() in _RETYPED:
                out[cipher.blind_index(f"{ident.authority}|{ident.value}|{ident.id_type.strip().upper()}",
                                       scope="mrn")] = index
    return out


def slot(id_type: str, authority: str) -> tuple[str, str]:
    """What a patient holds one identifier of: its type (MR for an empty CX-5 and MRN) under an authority."""
    kind = id_type.strip().upper()[:16]
    return ("MR" if kind in ("", "MRN") else kind), authority[:AUTHORITY_STORED]


def check_slots(rows: list[PatientIdentifier], new: list[Identifier], listed: set[str]) -> None:
    """:class:`IdentifierConflict` when a new patient identifier's type and authority (:func:`slot`) hold
    another patient identifier of this patient that the message does not list."""
    taken: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        if row.id_type.strip().upper() in PATIENT_ID_TYPES:
            taken.setdefault(slot(row.id_type, row.authority), set()).add(row.id_index)
    for ident in new:
        if taken.get(slot(ident.id_type, ident.authority), set()) - listed:
            raise IdentifierConflict()
