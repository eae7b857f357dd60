"""An acknowledged instance that cannot be indexed never stops the DICOM listener from starting again.

On PostgreSQL an InstanceNumber or SeriesNumber beyond INTEGER (``3000000000``: valid IS text) failed every
insert: the indexer gave up, the record stayed in the journal, and the next start's recovery raised before
the port opened, so the ``dicom`` role crash-looped and the instance the sender saw acknowledged was never
stored. Out-of-range numbers are now stored as NULL; a record that still fails for good is moved to the
journal's encrypted quarantine (audited, internal ids only), recovery goes on, ``status`` says degraded, and
after a fix the record is re-indexed from there."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from dicom_helpers import stored_bytes, storescu, write_series
from pydicom import dcmread
from sqlmodel import col, select
from typer.testing import CliRunner

from msgate.cli import status_probe
from msgate.cli.app import app
from msgate.errors import HomeInUse
from msgate.listener import dataset, indexer, quarantine, server
from msgate.listener.record import encode_record
from msgate.storage import heartbeat, journal
from msgate.storage.index_dicom import BatchIndexer
from msgate.storage.ingest import Received
from msgate.storage.journal import Journal, read_segment
from msgate.storage.models import AuditEvent, Instance, Series, Study, utcnow
from msgate.storage.store import Store

pytestmark = [pytest.mark.integration]


def _echo(port: int) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["echoscu", "-aec", "MSGATE", "127.0.0.1", str(port)], capture_output=True, timeout=30,
                          check=False)


def _left_in_journal(store: Store) -> list[Path]:
    """Journal segments (top level) that still hold a record."""
    folder = store.settings.home / "dicom-journal"
    return [p for p in folder.glob("*.jnl") if p.stat().st_size and read_segment(p, store.ring)]


def _audits(store: Store, kind: str) -> list[AuditEvent]:
    with store.db.session() as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.kind == kind)).all())


def _dicom_status(store: Store) -> dict[str, Any]:
    """The dicom role as ``msgate status`` reports it, from this process's heartbeat."""
    heartbeat.beat(store.db, ["dicom"], utcnow())
    try:
        return status_probe.roles(store.db, ("dicom",))["dicom"]
    finally:
        heartbeat.clear(store.db, ["dicom"])


def test_out_of_range_numbers_are_stored_null_and_the_listener_starts_again(store: Store, tmp_path: Path) -> None:
    """The reviewer's scenario, with DCMTK storescu: the sender gets Success; the instance is indexed with
    NULL numbers; a restart opens the port (echoscu succeeds)."""
    path = write_series(tmp_path / "odd", count=1)[0]
    ds = dcmread(path)
    ds.InstanceNumber, ds.SeriesNumber = "3000000000", "-3000000000"  # valid IS text, outside INTEGER
    ds.save_as(path)
    store.settings.dicom.port = 0
    ae, srv, _ = server.start(store)
    try:
        sent = storescu(srv.server_address[1], [path])
        assert sent.returncode == 0, sent.stderr
    finally:
        ae.shutdown()
    ae, srv, _ = server.start(store)  # raised DataError (NumericValueOutOfRange) before the port opened
    try:
        echo = _echo(srv.server_address[1])
        assert echo.returncode == 0, echo.stderr
    finally:
        ae.shutdown()
    with store.db.session() as session:
        rows = session.exec(select(Instance)).all()
        series = session.exec(select(Series)).all()
    assert [(r.instance_number, r.current) for r in rows] == [(None, True)]
    assert [s.series_number for s in series] == [None]
    assert len(stored_bytes(store)) == 1
    assert not _left_in_journal(store) and not quarantine.entries(store.settings.home)


def _crashed_journal(store: Store, datas: list[bytes]) -> None:
    """Journal segments a crash left: every record acknowledged, none indexed."""
    jnl = Journal(store.settings.home / "dicom-journal", store.ring)
    jnl.append([encode_record(Received(d, dataset.parse(d), "CRASHED", "assoc-q1")) for d in datas])
    assert jnl._owner is not None
    os.close(jnl._owner)  # the process died: the kernel releases its lock, the segment stays
    jnl._owner = None


def test_a_record_that_fails_for_good_is_quarantined_and_reindexed_after_the_fix(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = write_series(tmp_path / "good", count=2)
    bad = write_series(tmp_path / "bad", count=1, description="AX T1", number=2)[0]
    bad_study = str(dcmread(bad).StudyInstanceUID)
    bad_sop = str(dcmread(bad).SOPInstanceUID)
    datas = [good[0].read_bytes(), bad.read_bytes(), good[1].read_bytes()]
    _crashed_journal(store, datas)

    real_study = BatchIndexer._study

    def poisoned(self: BatchIndexer, header: Any, calling_aet: str) -> tuple[int, bool]:
        if header.get("StudyInstanceUID") == bad_study:
            raise RuntimeError("an indexing bug")  # permanent: not Transient
        return real_study(self, header, calling_aet)

    monkeypatch.setattr(BatchIndexer, "_study", poisoned)
    store.settings.dicom.port = 0
    ae, srv, _ = server.start(store)  # raised RuntimeError: the port never opened
    try:
        echo = _echo(srv.server_address[1])
        assert echo.returncode == 0, echo.stderr
        with store.db.session() as session:
            assert len(session.exec(select(Instance)).all()) == 2  # the others were indexed
        assert not _left_in_journal(store)  # the segment is handled: deleted
        [entry] = quarantine.entries(store.settings.home)
        assert entry.path.parent == store.settings.home / "dicom-journal" / "quarantine"
        body = entry.path.read_bytes()
        assert bad_sop.encode() not in body and b"SYNTH^LISTENER" not in body  # encrypted as the journal is
        assert entry.reason == "RuntimeError"
        [event] = _audits(store, "instance.quarantined")
        assert event.subject == f"quarantine:{entry.id}" and event.detail["reason"] == "RuntimeError"
        text = json.dumps(event.detail)
        assert bad_sop not in text and bad_study not in text and "SYNTH" not in text and "MRN" not in text
        status = _dicom_status(store)
        assert status["health"] == "degraded" and status["quarantined"] == 1, status
        assert "quarantine" in status["reason"]
        with pytest.raises(HomeInUse):  # never while the listener runs (its next start decides the studies)
            indexer.reindex_quarantined(store)
    finally:
        ae.shutdown()

    monkeypatch.undo()  # the fix
    [done] = indexer.reindex_quarantined(store)
    assert done.id == entry.id and done.error is None and len(done.instance_ids) == 1
    assert not quarantine.entries(store.settings.home) and not entry.path.exists()
    assert sorted(v[0] for v in stored_bytes(store).values()) == sorted(datas)
    [event] = _audits(store, "instance.reindexed")
    assert event.subject == f"quarantine:{entry.id}" and event.detail["instance_ids"] == done.instance_ids
    with store.db.session() as session:
        studies = session.exec(select(Study).order_by(col(Study.id))).all()
    assert len(studies) == 2 and studies[-1].state == "receiving"  # decided by the dicom role's next start

    ae, srv, _ = server.start(store)
    try:
        assert _dicom_status(store)["health"] == "ok"
    finally:
        ae.shutdown()


def test_recovery_still_stops_on_a_database_outage(store: Store, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A transient failure is no reason to quarantine: the role does not start, and the record stays in
    the journal for the next start."""
    from msgate.errors import Transient

    data = write_series(tmp_path / "s", count=1)[0].read_bytes()
    _crashed_journal(store, [data])

    def away(self: BatchIndexer, header: Any, calling_aet: str) -> tuple[int, bool]:
        raise Transient("database unavailable (OperationalError)", code="db_unavailable")

    monkeypatch.setattr(BatchIndexer, "_study", away)
    store.settings.dicom.port = 0
    with pytest.raises(Transient):
        server.start(store)
    assert len(_left_in_journal(store)) == 1 and not quarantine.entries(store.settings.home)


def test_quarantine_cli_lists_and_reindexes(settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``msgate studies quarantine`` lists what is there; ``--reindex`` indexes it after the fix."""
    from msgate.storage.store import open_store

    store = open_store(settings)
    try:
        data = write_series(tmp_path / "s", count=1)[0].read_bytes()
        raw = encode_record(Received(data, dataset.parse(data), "SCU", "assoc-q2"))
        qid = quarantine.put(store, raw, reason="RuntimeError", actor="test", segment="x.jnl")
        assert journal.key_usage(settings.home) == {store.ring.active_id: 1}  # keys retire must keep its KEK
    finally:
        store.close()
    env = {"MSGATE_HOME": str(settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
           "MSGATE_STORAGE__PURGE_FREE_BYTES": "0"}
    if settings.database_url:
        env |= {"MSGATE_DATABASE_URL": settings.database_url, "MSGATE_STORAGE__BLOB_BACKEND": "postgres"}
    listed = CliRunner().invoke(app, ["studies", "quarantine", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    [doc] = json.loads(listed.stdout)
    assert doc["id"] == qid and doc["reason"] == "RuntimeError" and doc["assoc_id"] == "assoc-q2"
    again = CliRunner().invoke(app, ["studies", "quarantine", "--reindex", "--json"], env=env)
    assert again.exit_code == 0, again.output
    [result] = json.loads(again.stdout)
    assert result["id"] == qid and result["error"] is None and len(result["instance_ids"]) == 1
    assert json.loads(CliRunner().invoke(app, ["studies", "quarantine", "--json"], env=env).stdout) == []
