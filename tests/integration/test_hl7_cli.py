"""Operator views: ``messages list|show|replay`` and ``patients show`` (audited) on a real store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import select
from typer.testing import CliRunner

from msgate.cli import messages_cmd, patients_cmd
from msgate.config import load_settings
from msgate.hl7.mapping import map_messages
from msgate.hl7.msh import read_msh
from msgate.storage.models import AuditEvent
from msgate.storage.store import open_store

pytestmark = pytest.mark.integration
ORU = (b"MSH|^~\\&|LAB|HOSP|||20250101||ORU^R01^ORU_R01|Q1|P|2.5.1\rPID|1||MRN7^^^HOSP^MR||DOE^JANE||19800101|F\r"
       b"OBR|1|||x|||20250101\rOBX|1|NM|101281-4^NfL^LN||12.5|pg/mL|||||F|||20250101\r")
NO_PID = b"MSH|^~\\&|LAB|HOSP|||20250101||ORU^R01|Q2|P|2.5.1\rOBR|1\rOBX|1|NM|101281-4^NfL^LN||9\r"


def test_messages_and_patients_views(tmp_path: Path) -> None:
    store = open_store(load_settings(home=tmp_path, storage={"min_free_bytes": 0}))
    ids = [store.ingest.store_hl7(raw=r, header=read_msh(r).header()).message_id for r in (ORU, NO_PID)]
    map_messages(store, ids, acks={ids[0]: "AA", ids[1]: "AA"})
    env = {"MSGATE_HOME": str(tmp_path), "MSGATE_STORAGE__MIN_FREE_BYTES": "0"}
    run = CliRunner().invoke
    listed = json.loads(run(messages_cmd.app, ["list", "--json"], env=env).output)
    assert {(m["type"], m["control_id"], m["ack"], m["mapping_state"]) for m in listed} == {
        ("ORU^R01", "Q1", "AA", "mapped"), ("ORU^R01", "Q2", "AA", "error")}
    shown = json.loads(run(messages_cmd.app, ["show", str(ids[1]), "--json"], env=env).output)
    assert shown["mapping_error"] == "no_patient_segment" and "findings" in shown["validation"]
    with store.db.session() as session:  # the decrypted control ids shown (senders put MRNs in them)
        views = {e.subject: e.detail for e in session.exec(select(AuditEvent).where(AuditEvent.kind == "phi.view"))}
    assert sorted(views["messages:list"]["message_ids"]) == sorted(ids) and f"message:{ids[1]}" in views
    replay = run(messages_cmd.app, ["replay", "--errors"], env=env)
    assert replay.exit_code == 0 and "error no_patient_segment" in replay.output
    patient = run(patients_cmd.app, ["show", "HOSP|MRN7", "--at", "2025-03-01", "--json"], env=env)
    data = json.loads(patient.output)
    assert data["features"]["nfl"]["value"] == 12.5 and data["features"]["sex"]["value"] == "F"
    assert data["identifiers"] == [{"value": "MRN7", "authority": "HOSP", "type": "MR"}]
    assert json.loads(run(patients_cmd.app, ["show", "HOSP|MRN7", "--at", "2026-06-01", "--json"],
                          env=env).output)["features"]["nfl"] is None  # outside the 180-day validity
    with store.db.session() as session:
        assert session.exec(select(AuditEvent).where(AuditEvent.kind == "phi.view")).first() is not None
    store.close()
