"""HL7 -> EHR mapping cases that used to put wrong data in the tables (found in review, 2026-12-07):
an empty or status-only OBX, SN ranges, placer namespaces, identifier types, the sender's time zone, and
a merge naming several patients. Each test failed on the code before its fix."""
from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlmodel import select

from msgate.config import load_settings
from msgate.hl7.mapping import map_messages
from msgate.hl7.msh import read_msh
from msgate.storage import repo_ehr
from msgate.storage.models import Observation, Order, Patient, Study
from msgate.storage.store import Store, open_store
from msgate.workers import ehr


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    s = open_store(load_settings(home=tmp_path, storage={"min_free_bytes": 0}))
    yield s  # type: ignore[misc]
    s.close()


def _map(store: Store, text: str) -> int:
    raw = text.replace("\n", "\r").encode()
    stored = store.ingest.store_hl7(raw=raw, header=read_msh(raw).header())
    outcome = map_messages(store, [stored.message_id])[stored.message_id]
    assert outcome.state == "mapped", outcome
    return stored.message_id


def _oru(cid: str, mrn: str, obx: str, obr7: str = "20250101100000", msh7: str = "20250101120000") -> str:
    return (f"MSH|^~\\&|LAB|HOSP|||{msh7}||ORU^R01^ORU_R01|{cid}|P|2.5.1\n"
            f"PID|1||{mrn}^^^HOSP^MR||DOE^JANE||19800101|F\n"
            f"OBR|1|||LAB|||{obr7}\n" + obx)


def _snap(store: Store, mrn: str, at: datetime = datetime(2025, 2, 1, tzinfo=UTC)):
    with store.db.session() as s:
        p = repo_ehr.find_patient(s, store.cipher, [repo_ehr.Identifier(mrn, "HOSP")])
        return repo_ehr.snapshot(s, store.cipher, p, at)


# 1. OBX-11 'U' (status changed to final, results not resent; OBX-5 empty) wipes the preliminary value.
def test_status_U_keeps_preliminary_value(store: Store) -> None:
    _map(store, _oru("U1", "M1", "OBX|1|NM|101281-4^NfL^LN||10|pg/mL|||||P\n"))
    _map(store, _oru("U2", "M1", "OBX|1|NM|101281-4^NfL^LN|||pg/mL|||||U\n"))
    snap = _snap(store, "M1")
    assert snap["nfl"] is not None and snap["nfl"]["value"] == 10.0, snap["nfl"]


# 2. A later OBX with an empty value (e.g. status I/N, "see note") shadows the older valid value.
def test_empty_value_does_not_shadow_older_value(store: Store) -> None:
    _map(store, _oru("E1", "M2", "OBX|1|NM|101281-4^NfL^LN||10|pg/mL|||||F\n", obr7="20250101100000"))
    _map(store, _oru("E2", "M2", "OBX|1|NM|101281-4^NfL^LN|||pg/mL|||||I\n", obr7="20250115100000"))
    snap = _snap(store, "M2")
    assert snap["nfl"] is not None and snap["nfl"]["value"] == 10.0, snap["nfl"]


# 3. SN ranges/ratios: "^5^-^10" is stored as the number 5.
def test_sn_range_not_taken_as_number(store: Store) -> None:
    _map(store, _oru("S1", "M3", "OBX|1|SN|MS-SDMT^SDMT^L||^40^-^50|{score}|||||F\n"))
    snap = _snap(store, "M3")
    assert snap["sdmt"] is None, snap["sdmt"]


# 4. Placer numbers from two placer applications (EI namespace ORC-2.2) are one order: the second
#    patient's order takes over the first order's row and its accession -> the study links to patient B.
def test_placer_namespace_distinguishes_orders(store: Store) -> None:
    acc = store.cipher.blind_index("ACC1", scope="accession")
    with store.db.session() as s:
        s.add(Study(study_uid_index="uid1", accession_index=acc,
                    patient_id_enc=store.cipher.encrypt("PA", column="study.patient_id")))  # the images' MRN
        s.commit()
    _map(store, "MSH|^~\\&|HIS_A|HOSP|||20250102||ORM^O01|O1|P|2.5.1\nPID|1||PA^^^HOSP^MR\n"
                "ORC|NW|1001^HIS_A\nOBR|1|1001^HIS_A||MR^MRI brain||||||||||||||ACC1\n")
    _map(store, "MSH|^~\\&|HIS_B|HOSP|||20250103||ORM^O01|O2|P|2.5.1\nPID|1||PB^^^HOSP^MR\n"
                "ORC|NW|1001^HIS_B\nOBR|1|1001^HIS_B||MR^MRI knee\n")
    with store.db.session() as s:
        orders = s.exec(select(Order)).all()
        pa = repo_ehr.find_patient(s, store.cipher, [repo_ehr.Identifier("PA", "HOSP")])
        study = s.exec(select(Study)).one()
        lk = ehr.link(s, study, store.cipher)
        assert lk.patient_id == pa.id, ("study ACC1 (patient A) links to", lk.patient_id, "A is", pa.id,
                                        "orders", [(o.id, o.patient_id, o.status) for o in orders])


# 5. Identifier type (CX-5) is not part of the index: patient B's MRN 2002 equals patient A's account
#    number 2002 under the same authority -> B's results are filed on A, and A08 rewrites A's name.
def test_identifier_type_distinguishes_patients(store: Store) -> None:
    _map(store, "MSH|^~\\&|ADT|HOSP|||20250102||ADT^A04|A1|P|2.5.1\n"
                "PID|1||1001^^^HOSP^MR~2002^^^HOSP^AN||ALPHA^ANN||19700101|F\n")
    _map(store, "MSH|^~\\&|ADT|HOSP|||20250102||ADT^A04|A2|P|2.5.1\n"
                "PID|1||2002^^^HOSP^MR||BETA^BOB||19900101|M\n")
    with store.db.session() as s:
        assert len(s.exec(select(Patient)).all()) == 2


# 6. A timestamp without an offset is sender-local time (HL7 TS); MSH-7 carries the sender's offset.
def test_timestamp_without_offset_uses_sender_offset(store: Store) -> None:
    _map(store, _oru("T1", "M6", "OBX|1|NM|101281-4^NfL^LN||10|pg/mL|||||F|||20250101233000\n",
                     msh7="20250102080000+0100"))
    with store.db.session() as s:
        o = s.exec(select(Observation)).one()
        assert o.observed_at == datetime(2025, 1, 1, 22, 30, tzinfo=UTC), o.observed_at


# 7. MRG-1 repetitions naming two stored patient rows: only the first is merged; the other's identifier is
#    moved to the survivor but its observations stay on an identifier-less, unmerged patient.
def test_merge_with_two_retired_identifier_rows(store: Store) -> None:
    _map(store, _oru("R1", "R1", "OBX|1|NM|101281-4^NfL^LN||10|pg/mL|||||F\n"))
    _map(store, "MSH|^~\\&|LAB|LAB|||20250101120000||ORU^R01^ORU_R01|R2|P|2.5.1\n"
                "PID|1||X9^^^LAB^MR||DOE^JANE||19800101|F\nOBR|1|||LAB|||20250101100000\n"
                "OBX|1|NM|MS-SDMT^SDMT^L||40|{score}|||||F\n")
    _map(store, "MSH|^~\\&|ADT|HOSP|||20250102||ADT^A40^ADT_A39|R3|P|2.5.1\nEVN|A40|20250102\n"
                "PID|1||S1^^^HOSP^MR||DOE^JANE\nMRG|R1^^^HOSP^MR~X9^^^LAB^MR\n")
    with store.db.session() as s:
        s1 = repo_ehr.find_patient(s, store.cipher, [repo_ehr.Identifier("S1", "HOSP")])
        owners = {(o.code, o.patient_id) for o in s.exec(select(Observation)).all()}
        stray = [(p.id, p.merged_into_id) for p in s.exec(select(Patient)).all() if p.id != s1.id and p.merged_into_id is None]
    snap = _snap(store, "S1")
    assert snap["sdmt"] is not None and snap["nfl"] is not None, ("survivor", s1.id, "observations", owners, "unmerged", stray)


def test_a_correction_replaces_the_result_with_its_own_sub_id(store: Store) -> None:
    """Repeated OBX for one code told apart by OBX-4: a correction of sub-ID 1 used to replace sub-ID 2's
    row (the latest row of the code), leaving the old value of 1 and losing 2."""
    _map(store, _oru("D1", "M8", "OBX|1|NM|101281-4^NfL^LN|1|8|pg/mL|||||F\n"
                                 "OBX|2|NM|101281-4^NfL^LN|2|20|pg/mL|||||F\n"))
    _map(store, _oru("D2", "M8", "OBX|1|NM|101281-4^NfL^LN|1|9|pg/mL|||||C\n"))
    with store.db.session() as s:
        rows = [(o.sub_id, store.cipher.decrypt(o.value_enc, column="observation.value"))
                for o in s.exec(select(Observation)).all() if not o.withdrawn]
    assert sorted(rows) == [("1", "9.0"), ("2", "20.0")]
