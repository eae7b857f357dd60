"""``msgate patients show |MRN``: the MRN alone matches it under every assigning authority (CX-4).

Operators know the MRN, rarely the authority string the interface engine sent; ``|MRN`` used to match only
identifiers stored without an authority. Real HL7 goes in through the store's ingest path and the mapping,
one DICOM study through the DICOM ingest; the CLI runs through typer's CliRunner on the real app (the
embedded store and the machine's PostgreSQL)."""

from __future__ import annotations

import json

import pytest
from sqlmodel import col, select
from typer.testing import CliRunner, Result

from msgate.cli.app import app
from msgate.config import Settings
from msgate.hl7.mapping import map_messages
from msgate.hl7.msh import read_msh
from msgate.storage.models import AuditEvent, Patient
from msgate.storage.store import Store
from tests.dicom_factory import mr_slice

pytestmark = pytest.mark.integration
LONG_AUTHORITY = "2.16.840.1.113883.19.5.99999.1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18"  # > 64 characters


def adt(control_id: str, pid3: str, name: str, birth: str = "19800101") -> bytes:
    return (f"MSH|^~\\&|ADT|HOSP|||20250101||ADT^A04^ADT_A01|{control_id}|P|2.5.1\r"
            f"EVN|A04|20250101\rPID|1||{pid3}||{name}||{birth}|F\r").encode()


ORU = (b"MSH|^~\\&|LAB|HOSP|||20250101||ORU^R01^ORU_R01|L1|P|2.5.1\rPID|1||MRN300^^^HOSP_A^MR||ALPHA^ANN\r"
       b"OBR|1|||x|||20250101\rOBX|1|NM|101281-4^NfL^LN||12.5|pg/mL|||||F|||20250101\r")
ORM = (b"MSH|^~\\&|HIS|HOSP|||20250101||ORM^O01^ORM_O01|O1|P|2.5.1\r"
       b"PID|1||MRN300^^^&1.2.840.99&ISO^MR~MRN300^^^HOSP_B^MR||BETA^BEA\r"
       b"ORC|NW|PL300^HIS\rOBR|1|PL300^HIS||MRBRAIN|||20250101|||||||||||ACC300\r")
MESSAGES = [
    adt("A1", "MRN300^^^HOSP_A^MR", "ALPHA^ANN", "19700101"),
    adt("A2", "MRN300^^^&1.2.840.99&ISO^MR", "BETA^BEA", "19900202"),  # authority from CX-4.2 (a universal id)
    adt("A3", "MRN200^^^&1.2.840.77&ISO^MR", "GAMMA^GIL"),  # known only under an OID the operator never sees
    adt("A4", "MRN400^^^HOSP_A^MR~MRN400^^^RIS^MR", "DELTA^DOT"),  # one patient, the MRN under two authorities
    adt("A5", "E500^^^HOSP_A^MR~MRN500^^^HOSP_A^AN", "EPSILON^EVE"),  # account number MRN500: not an MRN
    adt("A6", "MRN500^^^HOSP_B^MR", "ZETA^ZOE"),
    adt("A7", f"MRN600^^^{LONG_AUTHORITY}^MR", "ETA^EDA"),  # the authority column keeps 64 characters of it
    adt("A8", "MRN700", "THETA^TIM"),  # no authority at all: |MRN matched only these before
    ORU, ORM,
]


def feed(store: Store) -> None:
    """The study first (it waits for its patient), then the HL7 through the ingest path and the mapping."""
    store.ingest.store_instance(source=mr_slice(mrn="MRN300", accession="ACC300"))
    ids = [store.ingest.store_hl7(raw=r, header=read_msh(r).header()).message_id for r in MESSAGES]
    outcomes = map_messages(store, ids, acks=dict.fromkeys(ids, "AA"))
    assert {o.state for o in outcomes.values()} == {"mapped"}, outcomes


def cli(settings: Settings, *args: str) -> Result:
    env = {"MSGATE_HOME": str(settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
           "MSGATE_STORAGE__PURGE_FREE_BYTES": "0"}
    if settings.database_url:
        env |= {"MSGATE_DATABASE_URL": settings.database_url, "MSGATE_STORAGE__BLOB_BACKEND": "postgres"}
    return CliRunner().invoke(app, list(args), env=env)


def patient_named(store: Store, name: str) -> int:
    with store.db.session() as session:
        for p in session.exec(select(Patient)).all():
            if store.cipher.decrypt(p.name_enc, column="patient.name") == name:
                assert p.id is not None
                return p.id
    raise AssertionError(name)


def phi_views(store: Store) -> list[AuditEvent]:
    with store.db.session() as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.kind == "phi.view")
                                 .order_by(col(AuditEvent.seq))).all())


def show(settings: Settings, ident: str) -> dict[str, object]:
    out = cli(settings, "patients", "show", ident, "--json")
    assert out.exit_code == 0, out.output
    return dict(json.loads(out.stdout))


def test_an_mrn_alone_finds_its_patient_under_any_authority(store: Store, settings: Settings) -> None:
    feed(store)
    gamma = show(settings, "|MRN200")
    assert gamma["name"] == "GAMMA^GIL" and gamma["id"] == patient_named(store, "GAMMA^GIL")
    assert gamma["identifiers"] == [{"value": "MRN200", "authority": "1.2.840.77", "type": "MR"}]
    assert show(settings, "MRN200")["id"] == gamma["id"]  # a bare MRN is the same as |MRN
    assert show(settings, "|MRN400")["name"] == "DELTA^DOT"  # two authorities, one patient: shown
    assert show(settings, "|MRN500")["name"] == "ZETA^ZOE"  # the account number 500 is not MRN 500
    assert show(settings, "|MRN600")["name"] == "ETA^EDA"  # authority longer than its column
    assert show(settings, "|MRN700")["name"] == "THETA^TIM"  # stored without authority: still found
    assert show(settings, "1.2.840.77|MRN200")["id"] == gamma["id"]  # AUTHORITY|MRN as before
    missing = cli(settings, "patients", "show", "|MRN999")
    assert missing.exit_code == 1 and "no such patient" in missing.output
    assert [e.subject for e in phi_views(store)] == [f"patient:{patient_named(store, n)}" for n in (
        "GAMMA^GIL", "GAMMA^GIL", "DELTA^DOT", "ZETA^ZOE", "ETA^EDA", "THETA^TIM", "GAMMA^GIL")]


def test_an_mrn_of_several_patients_lists_them_and_exits_2(store: Store, settings: Settings) -> None:
    feed(store)
    alpha, beta = patient_named(store, "ALPHA^ANN"), patient_named(store, "BETA^BEA")
    out = cli(settings, "patients", "show", "|MRN300", "--json")
    assert out.exit_code == 2, out.output
    assert "give AUTHORITY|MRN or id:N" in out.stderr and "2 patients" in out.stderr
    candidates = json.loads(out.stdout)["candidates"]
    assert candidates == [
        {"id": alpha, "authorities": [{"authority": "HOSP_A", "type": "MR"}], "name": "ALPHA^ANN",
         "birth_date": "19700101", "studies": 0, "orders": 0, "observations": 1},
        {"id": beta, "authorities": [{"authority": "1.2.840.99", "type": "MR"}, {"authority": "HOSP_B", "type": "MR"}],
         "name": "BETA^BEA", "birth_date": "19900202", "studies": 1, "orders": 1, "observations": 0},
    ]
    table = cli(settings, "patients", "show", "|MRN300")
    assert table.exit_code == 2
    assert table.stdout.splitlines() == [
        f"{alpha:>8}  HOSP_A (MR)  ALPHA^ANN  born 19700101  studies=0 orders=0 observations=1",
        f"{beta:>8}  1.2.840.99 (MR), HOSP_B (MR)  BETA^BEA  born 19900202  studies=1 orders=1 observations=0"]
    views = phi_views(store)
    assert [(e.subject, e.detail) for e in views] == [("patients:candidates", {
        "view": "patients.show.candidates", "patient_ids": [alpha, beta], "count": 2})] * 2
    details = json.dumps([e.detail for e in views])
    assert "MRN300" not in details and "ALPHA" not in details  # internal ids only in the audit chain
    assert show(settings, "HOSP_B|MRN300")["id"] == beta  # the authority the list named picks one
    assert show(settings, str(alpha))["name"] == "ALPHA^ANN"  # and so does the internal id
    assert show(settings, f"id:{alpha}")["name"] == "ALPHA^ANN"


def test_a_numeric_mrn_that_is_another_patients_internal_id_is_not_shown_as_that_patient(
        store: Store, settings: Settings) -> None:
    """Most MRNs are digits. A bare ``2`` was taken as internal id 2 first: the operator asked for the patient
    holding MRN 2 and was shown (and audited as viewing) another patient."""
    ids = [store.ingest.store_hl7(raw=r, header=read_msh(r).header()).message_id for r in (
        adt("N1", "2^^^HOSP_A^MR", "FIRST^PAT"), adt("N2", "1^^^HOSP_A^MR", "SECOND^PAT"),
        adt("N3", "77^^^HOSP_A^MR", "THIRD^PAT"))]
    map_messages(store, ids, acks=dict.fromkeys(ids, "AA"))
    first, second = patient_named(store, "FIRST^PAT"), patient_named(store, "SECOND^PAT")
    assert (first, second) == (1, 2)  # MRN 2 belongs to patient 1; internal id 2 is the holder of MRN 1
    out = cli(settings, "patients", "show", "2", "--json")
    assert out.exit_code == 2, out.output
    assert "an MRN and an internal id" in out.stderr and "id:N" in out.stderr
    assert [c["id"] for c in json.loads(out.stdout)["candidates"]] == [first, second]
    assert show(settings, "|2")["name"] == "FIRST^PAT"  # the MRN
    assert show(settings, "id:2")["name"] == "SECOND^PAT"  # the internal id
    assert show(settings, "77")["name"] == "THIRD^PAT"  # an MRN that is no internal id: no question asked
    assert show(settings, "3")["name"] == "THIRD^PAT"  # an internal id that is no MRN
