"""Operator views print stored data verbatim, audit every PHI row they show, and report with the right
units and exit codes (review findings on the CLI), through typer's CliRunner on a real store."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlmodel import col, select
from typer.testing import CliRunner, Result

from msgate.cli import common, jobs_cmd, messages_cmd, patients_cmd, status_cmd, studies_cmd, trace_cmd
from msgate.cli.common import State
from msgate.config import load_settings
from msgate.errors import Transient
from msgate.hl7.mapping import map_messages
from msgate.hl7.msh import read_msh
from msgate.storage.models import AuditEvent, Job, Study
from msgate.storage.store import Store, open_store
from tests.dicom_factory import mr_slice

JOB_ID = "abcdef" + "0" * 26
ORU = (b"MSH|^~\\&|LAB|HOSP|||20250101||ORU^R01^ORU_R01|Q[/x]1|P|2.5.1\r"
       b"PID|1||MRN[7]^^^HOSP^MR||DOE [b]^JA[/i]NE||19800101|F\r"
       b"OBR|1|||x|||20250101\rOBX|1|NM|101281-4^NfL^LN||12.5|pg/mL|||||F|||20250101\r")


@pytest.fixture
def cstore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """An embedded store; the CLI's console is wide enough that no table cell is cut."""
    monkeypatch.setattr(common.console, "_width", 240)
    st = open_store(load_settings(home=tmp_path / "home", storage={"min_free_bytes": 0, "purge_free_bytes": 0}))
    yield st
    st.close()


def _cli(store: Store, app: typer.Typer | Callable[..., Any], args: list[str]) -> Result:
    if not isinstance(app, typer.Typer):  # a single command (trace, status)
        single = typer.Typer()
        single.command()(app)
        app = single
    return CliRunner().invoke(app, args, obj=State(store.settings))


def _audit(store: Store, kind: str) -> list[AuditEvent]:
    with store.db.session() as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.kind == kind)
                                 .order_by(col(AuditEvent.seq))).all())


def _failed_job(store: Store, error: str, stages: dict[str, Any] | None = None) -> None:
    stored = store.ingest.store_instance(source=mr_slice(accession="ACC[x]77"))
    with store.db.session() as session:
        session.add(Job(id=JOB_ID, study_id=stored.study_id, idem_key="k", state="failed", error=error,
                        stages=stages or {}))


# --- 1. stored text is never rich markup -------------------------------------------------------------


def test_studies_views_print_bracketed_phi_and_dicom_text_verbatim(cstore: Store) -> None:
    cstore.ingest.store_instance(source=mr_slice(accession="ACC[x]77", mrn="MRN[b]42", description="AX FLAIR [fs]"))
    cstore.ingest.store_instance(source=mr_slice(accession="ACC9", description="T2 [/fs] SAG"))
    first = _cli(cstore, studies_cmd.app, ["show", "1"])
    assert first.exit_code == 0, first.output
    assert "accession ACC[x]77  patient MRN[b]42" in first.output and "AX FLAIR [fs]" in first.output
    second = _cli(cstore, studies_cmd.app, ["show", "2"])  # "[/fs]" used to raise MarkupError
    assert second.exit_code == 0, second.output
    assert "T2 [/fs] SAG" in second.output
    listed = _cli(cstore, studies_cmd.app, ["list"])
    assert listed.exit_code == 0 and "ACC[x]77" in listed.output and "MRN[b]42" in listed.output


def test_jobs_and_trace_print_a_reason_verbatim(cstore: Store) -> None:
    _failed_job(cstore, "decode failed: [/fs] [bold]x")
    shown = _cli(cstore, jobs_cmd.app, ["show", JOB_ID])
    assert shown.exit_code == 0, shown.output
    assert "reason: decode failed: [/fs] [bold]x" in shown.output
    listed = _cli(cstore, jobs_cmd.app, ["list"])
    assert listed.exit_code == 0 and "decode failed: [/fs] [bold]x" in listed.output
    traced = _cli(cstore, trace_cmd.command, ["ACC[x]77"])
    assert traced.exit_code == 0, traced.output
    assert "error: decode failed: [/fs] [bold]x" in traced.output


def test_messages_and_patients_views_print_hl7_fields_verbatim(cstore: Store) -> None:
    [mid] = [cstore.ingest.store_hl7(raw=ORU, header=read_msh(ORU).header()).message_id]
    map_messages(cstore, [mid], acks={mid: "AA"})
    listed = _cli(cstore, messages_cmd.app, ["list"])
    assert listed.exit_code == 0 and "Q[/x]1" in listed.output, listed.output
    shown = _cli(cstore, messages_cmd.app, ["show", str(mid)])
    assert shown.exit_code == 0 and "Q[/x]1" in shown.output, shown.output
    patient = _cli(cstore, patients_cmd.app, ["show", "HOSP|MRN[7]"])
    assert patient.exit_code == 0, patient.output
    assert "MRN[7]" in patient.output and "JA[/i]NE" in patient.output and "DOE [b]" in patient.output


def test_status_render_prints_reasons_verbatim() -> None:
    report = {"health": "degraded", "database": {"health": "ok", "backend": "sqlite"},
              "jobs": {"last_hour": {"failed": 1}, "p50_s": None, "p95_s": None,
                       "recent_failures": [{"job": "abcdef00", "reason": "series [/fs] unreadable"}]},
              "outbox": {"health": "degraded", "backlog": 1, "oldest_s": 3.0, "dead_letters": 0,
                         "recent_errors": [{"destination": "pacs", "reason": "peer said [red]no"}]}}
    with common.console.capture() as captured:
        common.console.print(status_cmd.render(report))
    assert "series [/fs] unreadable" in captured.get() and "peer said [red]no" in captured.get()


# --- 3. every study shown is audited ------------------------------------------------------------------


def test_studies_list_audits_every_displayed_study(cstore: Store) -> None:
    with cstore.db.session() as session:
        for i in range(1203):
            session.add(Study(study_uid_index=f"u{i}", state="ready",
                              accession_enc=cstore.cipher.encrypt(f"ACC{i:04d}", column="study.accession")))
    out = _cli(cstore, studies_cmd.app, ["list", "--limit", "1203", "--json"])
    assert out.exit_code == 0
    shown = [d["id"] for d in json.loads(out.output)]
    events = _audit(cstore, "phi.view")
    assert [len(e.detail["study_ids"]) for e in events] == [500, 500, 203]
    assert [e.detail["study_ids"] for e in events] == [shown[:500], shown[500:1000], shown[1000:]]
    assert {(e.detail["count"], e.detail["parts"]) for e in events} == {(1203, 3)}


# --- 4. status on a database without the schema -------------------------------------------------------


def test_status_on_a_database_without_the_schema_is_down(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path / "home", storage={"min_free_bytes": 0})
    from msgate.storage import keyring

    keyring.init(settings.keyring_path)
    report = status_cmd.collect(settings)
    assert report["health"] == "down"
    assert report["database"] == {"health": "down", "reason": "schema missing; run msgate db upgrade",
                                  "backend": "sqlite"}
    assert "roles" not in report  # stopped there: no probe ran on the missing tables


def test_status_reports_a_probe_error_as_down(cstore: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    def lost(*args: object) -> None:
        raise Transient("database unavailable (OperationalError)", code="db_unavailable")

    monkeypatch.setattr(status_cmd.probe, "outbox", lost)
    monkeypatch.setattr(status_cmd.probe, "broker", lambda settings: {"health": "ok"})
    out = _cli(cstore, status_cmd.command, ["--json"])
    assert out.exit_code == 2, out.output
    report = json.loads(out.output)
    assert report["health"] == "down"
    assert report["database"]["reason"] == "database probe failed: database unavailable (OperationalError)"


# --- 5. trace units ------------------------------------------------------------------------------------


def test_trace_prints_stage_timings_in_milliseconds(cstore: Store) -> None:
    _failed_job(cstore, "x", {"queue_wait_ms": 1500.0, "inference_ms": 850.3, "batch": 4})
    out = _cli(cstore, trace_cmd.command, [JOB_ID[:8], "--json"])
    assert out.exit_code == 0, out.output
    stages = [e["event"] for e in json.loads(out.output)["events"] if e["event"].startswith("stages")]
    assert stages == ["stages: queue_wait 1500.0 ms, inference 850.3 ms, batch size 4"]


# --- 6. replay of a message that does not exist ----------------------------------------------------------


def test_replay_of_a_missing_message_fails_before_auditing(cstore: Store) -> None:
    out = _cli(cstore, messages_cmd.app, ["replay", "99"])
    assert out.exit_code == 1 and "no message 99" in out.output
    assert _audit(cstore, "hl7.replay") == []


# --- 7. help text follows the settings -------------------------------------------------------------------


def test_keys_init_help_names_the_keyring_setting() -> None:
    """It said "under MSGATE_HOME/keys", but the key ring goes where MSGATE_KEYRING_FILE says."""
    from msgate.cli import keys_cmd

    out = CliRunner().invoke(keys_cmd.app, ["init", "--help"], terminal_width=200)
    assert out.exit_code == 0 and "MSGATE_KEYRING_FILE" in out.output, out.output


def test_an_error_line_is_never_wrapped_inside_a_path(capsys: pytest.CaptureFixture[str]) -> None:
    """Error lines were wrapped at the console width (80 columns off a terminal), cutting a long path in
    two: it could not be copied, and a search for it in the output failed."""
    import typer

    from msgate.cli.common import fail

    path = "/srv/msgate/" + "/".join(f"folder{i:02d}" for i in range(12)) + "/keys"
    with pytest.raises(typer.Exit):
        fail(f"cannot use {path}: Not a directory (ENOTDIR)")
    assert path in capsys.readouterr().err
