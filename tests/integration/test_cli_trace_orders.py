"""``msgate trace <ORM control id>``: the order message is followed to its order row, the study the worker
links to that order (accession number, same patient: ``workers/ehr.link``), its jobs and their outbox.

Real HL7 goes in through the store's ingest path and the mapping, the study through the DICOM ingest; the
job is planned and created by the scheduler's own functions and its ORU goes through the outbox's enqueue,
claim and record. The CLI runs through typer's CliRunner on the real app (embedded store and PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, select
from typer.testing import CliRunner

from msgate.cli.app import app
from msgate.config import Settings
from msgate.hl7.mapping import map_messages
from msgate.hl7.msh import read_msh
from msgate.results import outbox
from msgate.storage import keyring
from msgate.storage.models import AuditEvent, Order, Study
from msgate.storage.store import Store
from msgate.workers import ehr, jobs
from tests.conftest import free_port, make_settings
from tests.dicom_factory import mr_slice

pytestmark = pytest.mark.integration


def hl7(control_id: str, kind: str, *segments: str) -> bytes:
    return "\r".join([f"MSH|^~\\&|HIS|HOSP|||20250101||{kind}|{control_id}|P|2.5.1", *segments, ""]).encode()


ADT = hl7("ADT-9", "ADT^A04^ADT_A01", "EVN|A04|20250101", "PID|1||MRN900^^^HOSP^MR||OMEGA^OLA||19700101|F")
ORDER_NEW = hl7("ORD-NW-9", "ORM^O01^ORM_O01", "PID|1||MRN900^^^HOSP^MR||OMEGA^OLA", "ORC|NW|PL900^HIS",
                "OBR|1|PL900^HIS||MRBRAIN|||20250101|||||||||||ACC900")
# the filler's status update: same placer number, no accession; the order row now names this message
ORDER_STATUS = hl7("ORD-SC-9", "ORM^O01^ORM_O01", "PID|1||MRN900^^^HOSP^MR||OMEGA^OLA", "ORC|SC|PL900^HIS|FL900^RIS",
                   "OBR|1|PL900^HIS|FL900^RIS|MRBRAIN")
# another facility's patient whose order has the same accession number: not the study's order
ORDER_OTHER = hl7("ORD-NW-8", "ORM^O01^ORM_O01", "PID|1||MRN800^^^CLINIC^MR||PSI^PIA", "ORC|NW|PL800^CLIN",
                  "OBR|1|PL800^CLIN||MRBRAIN|||20250101|||||||||||ACC900")


@pytest.fixture
def settings(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Settings:
    """conftest's storage matrix, with an interface engine configured so the job's ORU is queued."""
    pg = request.getfixturevalue("pg_url") if backend == "postgres" else None
    home = tmp_path / "home"
    if backend == "postgres":
        keyring.init(home / "keys" / "keyring.json")
    return make_settings(home, backend, pg, hl7_out={"port": free_port()})


def feed(store: Store) -> tuple[int, str]:
    """The study, the HL7 feed, then a job for the study and its ORU delivered. Returns (study id, job id)."""
    study_id = store.ingest.store_instance(source=mr_slice(mrn="MRN900", accession="ACC900")).study_id
    raws = (ADT, ORDER_NEW, ORDER_STATUS, ORDER_OTHER)
    ids = [store.ingest.store_hl7(raw=r, header=read_msh(r).header()).message_id for r in raws]
    assert {o.state for o in map_messages(store, ids, acks=dict.fromkeys(ids, "AA")).values()} == {"mapped"}
    with store.db.session() as session:  # the link the scheduler plans a job with (one slice has no FLAIR role)
        study = session.get(Study, study_id)
        assert study is not None
        link = ehr.link(session, study, store.cipher)
    assert link.order_id is not None
    job = jobs.create(store.db, study_id=study_id, idem_key="trace-orders", model_version="test-1",
                      flags={"patient_id": link.patient_id, "order_id": link.order_id})
    assert job is not None
    with store.db.session() as session:
        outbox.enqueue(store, session, job_id=job.id, objects=[outbox.Rendered("out.oru", b"MSH|^~\\&|MSGATE\r")])
    policy = outbox.Policy()
    [claimed] = outbox.claim(store, policy)
    assert outbox.record(store, claimed, outbox.Attempt("delivered", "AA"), policy) == "delivered"
    return study_id, job.id


def trace(settings: Settings, ident: str) -> dict[str, Any]:
    env = {"MSGATE_HOME": str(settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
           "MSGATE_STORAGE__PURGE_FREE_BYTES": "0"}
    if settings.database_url:
        env |= {"MSGATE_DATABASE_URL": settings.database_url, "MSGATE_STORAGE__BLOB_BACKEND": "postgres"}
    out = CliRunner().invoke(app, ["trace", ident, "--json"], env=env)
    assert out.exit_code == 0, out.output
    return dict(json.loads(out.stdout))


def order_of(store: Store, placer_namespace: str) -> int:
    """The order row whose placer number was sent with this namespace (the rows hold blind indexes only)."""
    with store.db.session() as session:
        for order in session.exec(select(Order).order_by(col(Order.id))).all():
            placer = store.cipher.decrypt(order.placer_enc, column="order.placer")
            if placer and order.placer_index == store.cipher.blind_index(f"{placer}|{placer_namespace}",
                                                                          scope="placer"):
                assert order.id is not None
                return order.id
    raise AssertionError(placer_namespace)


def test_an_order_control_id_reaches_its_study_jobs_and_outbox(store: Store, settings: Settings) -> None:
    study_id, job_id = feed(store)
    order_id = order_of(store, "HIS")
    for control_id in ("ORD-NW-9", "ORD-SC-9"):  # the first message too, though the row names the update
        data = trace(settings, control_id)
        assert data["studies"] == [study_id] and data["orders"] == [order_id], (control_id, data)
        seen = {(e["stage"], e["event"], e["ref"]) for e in data["events"]}
        assert ("hl7", f"order SC: study:{study_id}", f"order:{order_id}") in seen
        assert ("job", "job created (model test-1)", f"job:{job_id[:8]}") in seen
        events = [e["event"] for e in data["events"]]
        assert "hl7 to hl7 queued" in events and "attempt delivered: AA" in events and "hl7 delivered" in events
        assert any(e.startswith("study first instance") for e in events)
    with store.db.session() as session:
        traces = session.exec(select(AuditEvent).where(AuditEvent.kind == "operator.trace")
                              .order_by(col(AuditEvent.seq))).all()
    assert [(t.subject, t.detail) for t in traces] == [(f"study:{study_id}", {"orders": [order_id]})] * 2


def test_another_patients_order_with_the_same_accession_reaches_no_study(store: Store, settings: Settings) -> None:
    study_id, _ = feed(store)
    other = order_of(store, "CLIN")
    data = trace(settings, "ORD-NW-8")
    assert data["studies"] == [] and data["orders"] == [other]
    assert [e["event"] for e in data["events"] if e["ref"] == f"order:{other}"] == ["order NW: no study linked"]
    assert not any(e["ref"].startswith("job:") for e in data["events"])
    assert trace(settings, "ACC900")["studies"] == [study_id]  # the accession itself still finds the study


def test_a_control_id_past_the_scan_window_says_so_and_scan_0_finds_it(settings: Settings, store: Store) -> None:
    """Control ids have no blind index: trace decrypts the newest ``--scan`` messages. An older message used to
    get a plain "nothing found", as if it never arrived; the answer now says how far it looked."""
    raws = [hl7(f"OLD-{i}", "ADT^A08^ADT_A01", "EVN|A08|20250101", f"PID|1||MRN91{i}^^^HOSP^MR||RHO^RIA") for i in
            range(3)]
    for raw in raws:
        store.ingest.store_hl7(raw=raw, header=read_msh(raw).header())
    env = {"MSGATE_HOME": str(settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
           "MSGATE_STORAGE__PURGE_FREE_BYTES": "0"}
    if settings.database_url:
        env |= {"MSGATE_DATABASE_URL": settings.database_url, "MSGATE_STORAGE__BLOB_BACKEND": "postgres"}
    missed = CliRunner().invoke(app, ["trace", "OLD-0", "--scan", "2"], env=env)
    said = " ".join(missed.output.split())
    assert missed.exit_code == 1 and "newest 2 of 3 messages only: --scan 0 searches them all" in said, said
    assert CliRunner().invoke(app, ["trace", "OLD-2", "--scan", "2"], env=env).exit_code == 0  # inside the window
    found = CliRunner().invoke(app, ["trace", "OLD-0", "--scan", "0", "--json"], env=env)
    assert found.exit_code == 0, found.output
    assert any(e["stage"] == "hl7" for e in json.loads(found.stdout)["events"])
