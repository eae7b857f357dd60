"""ADT identity events and patient resolution (review 2026-12, defects #1 and #3), through the ingest
path and the mapping: the merges A18/A30/A36 like A40, A47 as an identifier change (or a merge when the new
identifier already names another patient), A37 and the other identity events msgate does not apply with a
W finding instead of a plain ``skipped``, and secondary identifiers (SS, DL, AN, ...) that never find a
patient. ``store`` is conftest's: the embedded SQLite and the machine's PostgreSQL."""
from __future__ import annotations

import pytest
from sqlmodel import col, select

from msgate.hl7.mapping import Outcome, map_messages
from msgate.hl7.msh import read_msh
from msgate.storage import repo_ehr
from msgate.storage.models import AuditEvent, Observation, Patient, PatientIdentifier, Study
from msgate.storage.store import Store

NFL = "OBX|1|NM|101281-4^NfL^LN||{v}|pg/mL|||||F|||20261015\n"


def put(store: Store, *texts: str) -> list[Outcome]:
    """Store the messages and map them as one batch (the mapping role's fast path)."""
    ids = []
    for text in texts:
        raw = text.replace("\n", "\r").encode()
        ids.append(store.ingest.store_hl7(raw=raw, header=read_msh(raw).header()).message_id)
    outcomes = map_messages(store, ids)
    return [outcomes[i] for i in ids]


def adt(trigger: str, cid: str, pid3: str, name: str = "DOE^JANE", mrg: str = "", structure: str = "") -> str:
    text = (f"MSH|^~\\&|HIS|HOSP|||20261001||ADT^{trigger}{structure}|{cid}|P|2.5.1\nEVN|{trigger}\n"
            f"PID|1||{pid3}||{name}||19800101|F\n")
    return text + (f"MRG|{mrg}\n" if mrg else "")


def oru(cid: str, mrn: str, value: str = "12") -> str:
    return (f"MSH|^~\\&|LAB|HOSP|||20261015||ORU^R01^ORU_R01|{cid}|P|2.5.1\nPID|1||{mrn}^^^HOSP^MR\n"
            f"OBR|1||F{cid}|NFL\n" + NFL.format(v=value))


def who(store: Store, mrn: str, authority: str = "HOSP") -> int | None:
    with store.db.session() as s:
        p = repo_ehr.find_patient(s, store.cipher, [repo_ehr.Identifier(mrn, authority)])
        return None if p is None else p.id


def nfl_owners(store: Store) -> set[int]:
    with store.db.session() as s:
        return {o.patient_id for o in s.exec(select(Observation)).all()}


def audit_kinds(store: Store) -> list[str]:
    with store.db.session() as s:
        return [e.kind for e in s.exec(select(AuditEvent).order_by(col(AuditEvent.seq))).all()
                if e.kind.startswith("patient.")]


@pytest.mark.parametrize("trigger,structure", [("A18", "^ADT_A18"), ("A30", "^ADT_A30"), ("A36", "^ADT_A30"),
                                               ("A40", "^ADT_A39"), ("A34", "^ADT_A30")])
def test_older_merge_events_merge_like_a40(store: Store, trigger: str, structure: str) -> None:
    put(store, oru("R1", "OLD"), adt("A04", "S1", "NEW^^^HOSP^MR"))
    [merge] = put(store, adt(trigger, "M1", "NEW^^^HOSP^MR", mrg="OLD^^^HOSP^MR", structure=structure))
    assert merge.state == "mapped" and merge.findings == [], merge
    survivor = who(store, "NEW")
    assert survivor is not None and who(store, "OLD") == survivor and nfl_owners(store) == {survivor}
    assert audit_kinds(store) == ["patient.merged"]


def test_a47_replaces_the_identifier_and_links_the_waiting_study(store: Store) -> None:
    index = repo_ehr.id_index(store.cipher, repo_ehr.Identifier("MRN9", "HOSP"))
    with store.db.session() as s:  # an MRI already filed under the permanent MRN, waiting for its patient
        s.add(Study(study_uid_index="uid-a47", dicom_patient_index=index))
        s.commit()
    put(store, adt("A04", "A1", "MRN1^^^HOSP^MR"), oru("R1", "MRN1"))
    first = who(store, "MRN1")
    [change] = put(store, adt("A47", "C1", "MRN9^^^HOSP^MR", name="DOE^JANE^Q", mrg="MRN1^^^HOSP^MR",
                              structure="^ADT_A30"))
    assert change.state == "mapped" and change.patient_id == first and change.findings == [], change
    assert who(store, "MRN9") == first and who(store, "MRN1") is None and nfl_owners(store) == {first}
    with store.db.session() as s:
        patient = s.get(Patient, first)
        assert store.cipher.decrypt(patient.name_enc, column="patient.name") == "DOE^JANE^Q"  # type: ignore[union-attr]
        assert s.exec(select(Study)).one().patient_id == first
    assert audit_kinds(store) == ["patient.identifiers_changed"]
    [again] = put(store, adt("A47", "C2", "MRN9^^^HOSP^MR", mrg="MRN1^^^HOSP^MR"))  # sent twice
    assert again.state == "mapped" and again.patient_id == first, again
    with store.db.session() as s:
        assert len(s.exec(select(Patient)).all()) == 1


def test_a47_to_an_identifier_of_another_patient_is_a_merge(store: Store) -> None:
    put(store, adt("A04", "A1", "TMP1^^^HOSP^MR"), oru("R1", "TMP1"), adt("A04", "A2", "MRN9^^^HOSP^MR"))
    temporary, permanent = who(store, "TMP1"), who(store, "MRN9")
    assert temporary != permanent
    [change] = put(store, adt("A47", "C1", "MRN9^^^HOSP^MR", mrg="TMP1^^^HOSP^MR"))
    assert change.state == "mapped" and change.patient_id == permanent, change
    assert who(store, "TMP1") == permanent and nfl_owners(store) == {permanent}
    with store.db.session() as s:
        assert s.get(Patient, temporary).merged_into_id == permanent  # type: ignore[union-attr]
    assert audit_kinds(store) == ["patient.merged"]


def test_a47_for_an_unknown_prior_identifier_files_the_patient_with_a_finding(store: Store) -> None:
    [change] = put(store, adt("A47", "C1", "MRN9^^^HOSP^MR", mrg="NEVERSEEN^^^HOSP^MR"))
    assert change.state == "mapped" and who(store, "MRN9") == change.patient_id is not None
    assert {"code": "prior_identifier_unknown", "location": "MRG^1^1", "severity": "W"} in change.findings


@pytest.mark.parametrize("trigger", ["A37", "A24", "A43", "A48"])
def test_identity_events_not_applied_are_not_a_plain_skip(store: Store, trigger: str) -> None:
    """A03 (a discharge) is skipped quietly; an unlink or a move msgate does not apply says so."""
    put(store, adt("A04", "A1", "MRN1^^^HOSP^MR"))
    [discharge, identity] = put(store, adt("A03", "D1", "MRN1^^^HOSP^MR"),
                                adt(trigger, "L1", "MRN1^^^HOSP^MR", mrg="MRN2^^^HOSP^MR"))
    assert (discharge.state, discharge.findings) == ("skipped", [])
    assert identity.state == "skipped"
    assert {"code": "identity_event_not_applied", "location": "MSH^1^9^1^2", "severity": "W"} in identity.findings


def test_a_secondary_identifier_in_mrg_merges_nobody(store: Store) -> None:
    """MRG-1 with only an SSN: the SSN does not say which patient retires."""
    put(store, adt("A04", "A1", "MRN1^^^HOSP^MR~999999999^^^SSA^SS"), adt("A04", "A2", "MRN2^^^HOSP^MR"))
    put(store, adt("A40", "M1", "MRN2^^^HOSP^MR", mrg="999999999^^^SSA^SS", structure="^ADT_A39"))
    assert who(store, "MRN1") != who(store, "MRN2")
    with store.db.session() as s:
        assert all(p.merged_into_id is None for p in s.exec(select(Patient)).all())


@pytest.mark.parametrize("kind", ["SS", "DL", "AN", "VN", "PPN", "BA", "MC"])
def test_no_secondary_type_finds_a_patient(store: Store, kind: str) -> None:
    """Another MRN with Jane's secondary identifier is another patient; the secondary identifier alone names
    nobody (``no_patient_identifier``, the AE's ERR names PID-3) and Jane stays as she is."""
    [jane] = put(store, adt("A04", "A1", f"MRN1^^^HOSP^MR~X1^^^AUTH^{kind}"))
    [other, alone] = put(store, adt("A04", "A2", f"MRN2^^^HOSP^MR~X1^^^AUTH^{kind}", name="ROE^RICHARD"),
                         adt("A08", "A3", f"X1^^^AUTH^{kind}", name="ROE^RICHARD"))
    assert other.state == "mapped" and other.patient_id not in (None, jane.patient_id), other
    assert (alone.state, alone.error) == ("error", "no_patient_identifier")
    with store.db.session() as s:
        patient = s.get(Patient, jane.patient_id)
        assert store.cipher.decrypt(patient.name_enc, column="patient.name") == "DOE^JANE"  # type: ignore[union-attr]
        kinds = sorted((i.patient_id, i.id_type) for i in s.exec(select(PatientIdentifier)).all())
    assert kinds == sorted([(jane.patient_id, "MR"), (jane.patient_id, kind), (other.patient_id, "MR"),
                            (other.patient_id, kind)])


@pytest.mark.parametrize("kind", ["MR", "MRT", "PI", "PT", "PE", "", "JHN", "NNSWE", "NI", "NH", "A"])
def test_patient_types_find_their_patient(store: Store, kind: str) -> None:
    [first] = put(store, adt("A04", "A1", f"P1^^^AUTH^{kind}"))
    [again] = put(store, oru("R1", "MRN1").replace("MRN1^^^HOSP^MR", f"P1^^^AUTH^{kind}"))
    assert again.state == "mapped" and again.patient_id == first.patient_id, again


def test_an_mrt_stored_before_it_was_a_patient_type_still_finds_its_patient(store: Store) -> None:
    """MRT (temporary MRN) used to be indexed as a secondary type; those rows still name their patient."""
    with store.db.session() as s:
        patient = Patient()
        s.add(patient)
        s.flush()
        s.add(PatientIdentifier(patient_id=patient.id, authority="HOSP", id_type="MRT",
                                id_index=store.cipher.blind_index("HOSP|T5|MRT", scope="mrn"),
                                value_enc=store.cipher.encrypt("T5", column="patient_identifier.value")))
        s.commit()
        pid = patient.id
    [again] = put(store, adt("A08", "A1", "T5^^^HOSP^MRT"))
    assert again.state == "mapped" and again.patient_id == pid, again
    with store.db.session() as s:
        assert len(s.exec(select(PatientIdentifier)).all()) == 1


def test_a_conflict_writes_nothing_and_the_batch_goes_on(store: Store) -> None:
    put(store, adt("A04", "A1", "MRN1^^^HOSP^MR"), adt("A04", "A2", "MRN2^^^HOSP^MR", name="ROE^RICHARD"))
    outcomes = put(store, oru("R1", "MRN1"), adt("A08", "A3", "MRN1^^^HOSP^MR~MRN2^^^HOSP^MR", name="X^Y"),
                   oru("R2", "MRN2"))
    assert [(o.state, o.error) for o in outcomes] == [("mapped", None), ("error", "identifier_conflict"),
                                                      ("mapped", None)]
    with store.db.session() as s:
        names = sorted(store.cipher.decrypt(p.name_enc, column="patient.name") or ""
                       for p in s.exec(select(Patient)).all())
        assert names == ["DOE^JANE", "ROE^RICHARD"] and len(s.exec(select(PatientIdentifier)).all()) == 2


def test_a_message_that_lists_both_mrns_of_a_merged_patient_is_no_conflict(store: Store) -> None:
    put(store, adt("A04", "A1", "MRN1^^^HOSP^MR"), adt("A04", "A2", "MRN2^^^HOSP^MR"))
    put(store, adt("A40", "M1", "MRN1^^^HOSP^MR", mrg="MRN2^^^HOSP^MR", structure="^ADT_A39"))
    [after] = put(store, adt("A08", "A3", "MRN1^^^HOSP^MR~MRN2^^^HOSP^MR"))
    [new_mr] = put(store, adt("A08", "A4", "MRN1^^^HOSP^MR~MRN3^^^HOSP^MR"))
    assert after.state == "mapped" and after.patient_id == who(store, "MRN1")
    assert (new_mr.state, new_mr.error) == ("error", "identifier_conflict")  # MRN2 is hers, not in the message
