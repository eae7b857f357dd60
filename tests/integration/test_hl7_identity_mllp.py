"""Patient identity over real MLLP (review 2026-12, defects #1 and #3).

#1: two people who share a secondary identifier in PID-3 (a placeholder SSN) were one patient, the second
one's demographics over the first's. Patients are now found by patient identifiers only (CX-5 empty, MR,
PI, ...); identifiers naming two patients, or a second MR under an authority the patient already has one
under, end the message in ``error`` / ``identifier_conflict`` with an AE naming PID^1^3, and write nothing.

#3: A47 (change patient identifier list) and the older merge events A18/A30/A36 were stored as ``skipped``:
an MRN correction never reached the patient, and the MRI under the new MRN ran without its labs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import make_settings
from hl7_helpers import RawClient, err, msa, running_server, wait_row
from sqlmodel import col, select

from msgate.hl7.msh import read_msh
from msgate.storage import keyring, repo_ehr
from msgate.storage.models import AuditEvent, Hl7Message, Patient, PatientIdentifier
from msgate.storage.store import Store, open_store

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_workers_double as double  # noqa: E402

pytestmark = pytest.mark.integration
WORKERS = {"model_module": "test_workers_double", "ehr_deadline_seconds": 0, "required_ehr_fields": []}
ENHANCED = "|||AL|AL"  # MSH-15 accept ACK, MSH-16 application ACK: the mapping outcome comes back as AA/AE


def hl7(text: str) -> bytes:
    return text.strip().replace("\n", "\r").encode() + b"\r"


def a04(cid: str, pid3: str, name: str, birth: str, sex: str, extra: str = "") -> bytes:
    return hl7(f"MSH|^~\\&|HIS|HOSP|MSGATE|MSGATE|20261001120000||ADT^A04^ADT_A01|{cid}|P|2.5.1{extra}\n"
               f"EVN|A04|20261001120000\nPID|1||{pid3}||{name}||{birth}|{sex}")


@pytest.fixture()
def store(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Store:
    """A store on ``backend`` (the embedded SQLite, the machine's PostgreSQL); DICOM PatientIDs are HOSP's."""
    pg = request.getfixturevalue("pg_url") if backend == "postgres" else None
    home = tmp_path / "home"
    if backend == "postgres":
        keyring.init(home / "keys" / "keyring.json")
    st = open_store(make_settings(home, backend, pg, metrics={"enabled": False}, hl7={"port": 0},
                                  dicom={"default_issuer": "HOSP"}, workers=WORKERS))
    yield st  # type: ignore[misc]
    st.close()


def send(port: int, raw: bytes) -> list[bytes]:
    """Send one message; return its answers (the accept ACK, and in enhanced mode the application ACK)."""
    client = RawClient(port)
    try:
        first = client.exchange(raw)
        answers = [first]
        if msa(first)[1] == "CA":
            answers.append(client.recv_frame())
        return answers
    finally:
        client.close()


def row(store: Store, raw: bytes) -> Hl7Message:
    header = read_msh(raw).header()
    wait_row(store, header, raw)
    with store.db.session() as session:
        return session.exec(select(Hl7Message).where(
            Hl7Message.dedup_index == store.ingest.dedup_key(header, raw))).one()


def people(store: Store) -> dict[int, tuple[str | None, str | None, str | None, list[str]]]:
    """Each surviving patient: name, birth date, sex and its identifier values (decrypted)."""
    dec = store.cipher.decrypt
    with store.db.session() as session:
        out = {}
        for p in session.exec(select(Patient).where(col(Patient.merged_into_id).is_(None))).all():
            ids = session.exec(select(PatientIdentifier).where(PatientIdentifier.patient_id == p.id)
                               .order_by(col(PatientIdentifier.id))).all()
            out[p.id] = (dec(p.name_enc, column="patient.name"), dec(p.birth_date_enc, column="patient.birth_date"),
                         dec(p.sex_enc, column="patient.sex"),
                         [f"{i.id_type}:{dec(i.value_enc, column='patient_identifier.value')}" for i in ids])
        return out  # type: ignore[return-value]


def test_a_shared_ssn_does_not_merge_two_patients(store: Store) -> None:
    """The reviewer's scenario: Jane (MRN1) and Richard (MRN2) carry the same placeholder SSN."""
    jane = a04("A1", "MRN1^^^HOSP^MR~999999999^^^SSA^SS", "DOE^JANE", "19800101", "F")
    richard = a04("A2", "MRN2^^^HOSP^MR~999999999^^^SSA^SS", "ROE^RICHARD", "19500505", "M", ENHANCED)
    with running_server(store) as srv:
        assert msa(send(srv.port, jane)[0])[1] == "AA"
        answers = send(srv.port, richard)
        first, second = row(store, jane), row(store, richard)
    assert [msa(a)[1] for a in answers] == ["CA", "AA"]
    assert (second.mapping_state, second.mapping_error) == ("mapped", None)
    found = people(store)
    assert sorted(found.values()) == [
        ("DOE^JANE", "19800101", "F", ["MR:MRN1", "SS:999999999"]),
        ("ROE^RICHARD", "19500505", "M", ["MR:MRN2", "SS:999999999"]),  # stored for him, never used to find
    ], found
    assert first.patient_id != second.patient_id


def test_a_second_mrn_under_the_same_authority_is_a_conflict(store: Store) -> None:
    """A patient identifier (an enterprise PI) shared by mistake: it names Jane, who already has MRN1 at
    HOSP; Richard's A04 with MRN2 at HOSP would rename her. Nothing is written, the AE names PID-3."""
    jane = a04("B1", "MRN1^^^HOSP^MR~E77^^^EMPI^PI", "DOE^JANE", "19800101", "F")
    richard = a04("B2", "MRN2^^^HOSP^MR~E77^^^EMPI^PI", "ROE^RICHARD", "19500505", "M", ENHANCED)
    with running_server(store) as srv:
        send(srv.port, jane)
        answers = send(srv.port, richard)
        second = row(store, richard)
    assert [msa(a)[1] for a in answers] == ["CA", "AE"]
    fields = err(answers[1])
    assert fields[2] == "PID^1^3" and fields[3].split("^")[0] == "205" and fields[4] == "E", fields
    assert (second.mapping_state, second.mapping_error) == ("error", "identifier_conflict")
    assert list(people(store).values()) == [("DOE^JANE", "19800101", "F", ["MR:MRN1", "PI:E77"])]


def test_identifiers_naming_two_patients_are_a_conflict(store: Store) -> None:
    """PID-3 with Jane's MRN and Richard's: no arbitrary pick of one of them (the query had no ORDER BY)."""
    with running_server(store) as srv:
        send(srv.port, a04("C1", "MRN1^^^HOSP^MR", "DOE^JANE", "19800101", "F"))
        send(srv.port, a04("C2", "MRN2^^^HOSP^MR", "ROE^RICHARD", "19500505", "M"))
        both = a04("C3", "MRN1^^^HOSP^MR~MRN2^^^HOSP^MR", "ROE^RICHARD", "19500505", "M", ENHANCED)
        answers = send(srv.port, both)
        third = row(store, both)
    assert [msa(a)[1] for a in answers] == ["CA", "AE"] and err(answers[1])[2] == "PID^1^3"
    assert (third.mapping_state, third.mapping_error) == ("error", "identifier_conflict")
    assert sorted(people(store).values()) == [("DOE^JANE", "19800101", "F", ["MR:MRN1"]),
                                              ("ROE^RICHARD", "19500505", "M", ["MR:MRN2"])]


def test_the_same_mrn_with_an_ssn_still_links(store: Store) -> None:
    """The legitimate case: Jane's A04, then an A08 and an ORU with her MRN and her SSN are hers."""
    with running_server(store) as srv:
        send(srv.port, a04("D1", "MRN1^^^HOSP^MR", "DOE^JANE", "19800101", "F"))
        a08 = hl7("MSH|^~\\&|HIS|HOSP|MSGATE|MSGATE|20261002120000||ADT^A08^ADT_A01|D2|P|2.5.1|||AL|AL\n"
                  "EVN|A08\nPID|1||MRN1^^^HOSP^MR~123456789^^^SSA^SS||DOE^JANE^Q||19800101|F")
        oru = hl7("MSH|^~\\&|LAB|HOSP|MSGATE|MSGATE|20261015120000||ORU^R01^ORU_R01|D3|P|2.5.1\n"
                  "PID|1||123456789^^^SSA^SS~MRN1^^^HOSP^MR||DOE^JANE||19800101|F\nOBR|1||F1|NFL\n"
                  "OBX|1|NM|101281-4^NfL^LN||12.0|pg/mL|||||F|||20261015")
        assert [msa(a)[1] for a in send(srv.port, a08)] == ["CA", "AA"]
        send(srv.port, oru)
        rows = [row(store, a08), row(store, oru)]
    [(pid, jane)] = people(store).items()
    assert jane == ("DOE^JANE^Q", "19800101", "F", ["MR:MRN1", "SS:123456789"])
    assert [(r.mapping_state, r.patient_id) for r in rows] == [("mapped", pid), ("mapped", pid)]


def test_a47_moves_the_labs_to_the_new_mrn(store: Store) -> None:
    """The reviewer's scenario: a temporary MRN1 with its NfL, A47 to the permanent MRN9, then the MRI
    under MRN9: the case gets patient 1 and its NfL, and ``patients show '|MRN9'`` is patient 1."""
    from typer.testing import CliRunner

    from msgate.cli.app import app
    from msgate.workers.celery_app import build_app
    from msgate.workers.scheduler import Scheduler

    oru = hl7("MSH|^~\\&|LAB|HOSP|MSGATE|MSGATE|20261015120000||ORU^R01^ORU_R01|E2|P|2.5.1\n"
              "PID|1||MRN1^^^HOSP^MR||DOE^JANE||19800101|F\nOBR|1||F1|NFL\n"
              "OBX|1|NM|101281-4^NfL^LN||12.0|pg/mL|||||F|||20261015")
    a47 = hl7("MSH|^~\\&|HIS|HOSP|MSGATE|MSGATE|20261020120000||ADT^A47^ADT_A30|E3|P|2.5.1|||AL|AL\n"
              "EVN|A47|20261020120000\nPID|1||MRN9^^^HOSP^MR||DOE^JANE||19800101|F\nMRG|MRN1^^^HOSP^MR")
    with running_server(store) as srv:
        send(srv.port, a04("E1", "MRN1^^^HOSP^MR", "DOE^JANE", "19800101", "F"))
        send(srv.port, oru)
        answers = send(srv.port, a47)
        first, change = row(store, oru), row(store, a47)
    assert [msa(a)[1] for a in answers] == ["CA", "AA"]
    assert (change.mapping_state, change.mapping_error) == ("mapped", None)
    assert change.patient_id == first.patient_id
    double.make_study(store, seed=47, mrn="MRN9")  # PatientID MRN9, no IssuerOfPatientID: the default HOSP
    [job_id] = Scheduler(store, build_app(store.settings)).scan()
    from msgate.storage.models import Job

    with store.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.flags["patient_id"] == first.patient_id, job.flags
        assert "nfl" not in job.flags["ehr_missing"], job.flags
        assert repo_ehr.find_patient(session, store.cipher, [repo_ehr.Identifier("MRN1", "HOSP")]) is None
        kinds = [e.kind for e in session.exec(select(AuditEvent).order_by(col(AuditEvent.seq))).all()]
    assert "patient.identifiers_changed" in kinds
    env = {"MSGATE_HOME": str(store.settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
           "MSGATE_STORAGE__PURGE_FREE_BYTES": "0"}
    if store.settings.database_url:
        env |= {"MSGATE_DATABASE_URL": store.settings.database_url, "MSGATE_STORAGE__BLOB_BACKEND": "postgres"}
    out = CliRunner().invoke(app, ["patients", "show", "|MRN9", "--json"], env=env)
    assert out.exit_code == 0, out.output
    import json

    shown = json.loads(out.stdout)
    assert shown["id"] == first.patient_id and shown["identifiers"] == [
        {"value": "MRN9", "authority": "HOSP", "type": "MR"}], shown
