"""Outbox faults against real peers: PACS down then up, 0xA700, AE then AA, AR, and a sender killed mid-send."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import select, update

from msgate.results import outbox, outbox_ops
from msgate.results.hl7_out import OrderNumbers, render_oru
from msgate.storage.models import Job, OutboxEntry, Study, utcnow
from msgate.storage.store import Store, open_store
from tests.conftest import make_settings
from tests.integration.pacs_peers import (
    encode,
    flair_series,
    free_port,
    model_result,
    start_mllp_receiver,
    start_scripted_scp,
    start_storescp,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.peer]
FAST = outbox.Policy(base_delay=0.2, max_delay=1.0, lease=3.0, poll=0.1, dimse_timeout=10.0)


def _store(tmp: Path, *, pacs_port: int | None = None, hl7_port: int | None = None, ae: str = "ANY") -> Store:
    pacs = [{"name": "pacs", "host": "127.0.0.1", "port": pacs_port, "ae_title": ae}] if pacs_port else []
    hl7 = {"host": "127.0.0.1", "port": hl7_port} if hl7_port else None
    return open_store(make_settings(tmp / "home", "sqlite", pacs=pacs, hl7_out=hl7))


def _queue(store: Store, objects: list[outbox.Rendered]) -> list[str]:
    with store.db.session() as session:
        study = Study(study_uid_index=f"s-{time.monotonic_ns()}")
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, idem_key=f"j-{time.monotonic_ns()}", state="done")  # type: ignore[arg-type]
        session.add(job)
        session.flush()
        return [e.id for e in outbox.enqueue(store, session, job_id=job.id, objects=objects)]


def _dicom(n: int, seed: int = 0) -> list[outbox.Rendered]:
    return [outbox.Rendered("out.sc", encode(ds)) for ds in flair_series(n=n, rows=16, cols=16, seed=seed)]


def _oru() -> outbox.Rendered:
    src = flair_series(n=1, rows=8, cols=8)[0]
    settings = make_settings(Path("/nonexistent"), "sqlite", hl7_out={"port": 1})
    er7 = render_oru(model_result((12, 40, 48)), source=src, numbers=OrderNumbers("P1", "F1", "A1"), sr_uid="1.2.3",
                     correction=False, settings=settings)
    return outbox.Rendered("out.oru", er7.encode())


def _make_due(store: Store) -> None:
    with store.db.session() as session:
        session.exec(update(OutboxEntry).where(OutboxEntry.state == "pending")  # type: ignore[call-overload]
                     .values(next_attempt_at=utcnow()))


def _entries(store: Store) -> list[OutboxEntry]:
    with store.db.session() as session:
        return list(session.exec(select(OutboxEntry)).all())


def _history(store: Store, entry_id: str) -> list[tuple[str, str, str]]:
    with store.db.session() as session:
        return [(a.outcome, a.peer_status, a.detail) for a in outbox_ops.attempts_of(session, entry_id)]


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def test_pacs_down_then_up_delivers_exactly_once(tmp: Path) -> None:
    port = free_port()
    store = _store(tmp, pacs_port=port, ae="STORESCP")
    ids = _queue(store, _dicom(4))
    assert outbox.run_once(store, FAST) == 4
    assert {e.state for e in _entries(store)} == {"pending"}
    assert all(_history(store, i)[0][0] == "retry" and _history(store, i)[0][1].startswith("assoc_") for i in ids)
    scp = start_storescp(tmp / "scp", port=port)
    try:
        _make_due(store)
        outbox.run_once(store, FAST)
        assert {(e.state, e.attempts) for e in _entries(store)} == {("delivered", 2)}
        assert outbox.run_once(store, FAST) == 0
        wait_until(lambda: len(scp.files()) == 4, 10)
        time.sleep(0.3)
        assert len(scp.files()) == 4
    finally:
        scp.stop()
        store.close()


def test_out_of_resources_is_retried(tmp: Path) -> None:
    scp = start_scripted_scp([0xA700])
    store = _store(tmp, pacs_port=scp.port, ae="SCRIPTED")
    try:
        ids = _queue(store, _dicom(3))
        outbox.run_once(store, FAST)
        states = {e.id: e.state for e in _entries(store)}
        assert sorted(states.values()) == ["delivered", "delivered", "pending"]
        failed = next(i for i, s in states.items() if s == "pending")
        assert _history(store, failed)[0][:2] == ("retry", "0xA700")
        _make_due(store)
        outbox.run_once(store, FAST)
        assert {e.state for e in _entries(store)} == {"delivered"}
        assert scp.answered.count(0xA700) == 1 and len(scp.received) == 3
        assert len({ds.SOPInstanceUID for ds in scp.received}) == 3 == len(ids)
    finally:
        scp.stop()
        store.close()


def test_association_rejected_is_retried(tmp: Path) -> None:
    scp = start_scripted_scp([], ae_title="RIGHT", require_called_aet=True)
    store = _store(tmp, pacs_port=scp.port, ae="WRONG")
    try:
        entry = _queue(store, _dicom(1))[0]
        outbox.run_once(store, FAST)
        assert _entries(store)[0].state == "pending"
        assert _history(store, entry)[0][:2] == ("retry", "assoc_rejected")
        # the PACS's A-ASSOCIATE-RJ says why: the operator fixes the AE title instead of waiting
        assert _history(store, entry)[0][2] == ("association rejected (rejected permanent, service user: "
                                                "Called AE title not recognised)")
        assert _entries(store)[0].last_error == _history(store, entry)[0][2]
    finally:
        scp.stop()
        store.close()


def test_mllp_ae_then_aa_is_delivered_with_a_new_control_id(tmp: Path) -> None:
    rx = start_mllp_receiver(["AE"])
    store = _store(tmp, hl7_port=rx.port)
    try:
        entry = _queue(store, [_oru()])[0]
        outbox.run_once(store, FAST)
        assert _entries(store)[0].state == "pending"
        _make_due(store)
        outbox.run_once(store, FAST)
        assert _entries(store)[0].state == "delivered" and _entries(store)[0].attempts == 2
        assert rx.answered == ["AE", "AA"]
        ids = [m.split("\r")[0].split("|")[9] for m in rx.messages]
        assert len(set(ids)) == 2
        history = _history(store, entry)
        assert [h[:2] for h in history] == [("retry", "nak"), ("delivered", "AA")]
        assert all(f"MSH-10 {i}" in h[2] for i, h in zip(ids, history, strict=True))
        bodies = {m.split("\r", 1)[1] for m in rx.messages}
        assert len(bodies) == 1  # the same message apart from MSH
    finally:
        rx.stop()
        store.close()


def test_mllp_ar_dead_letters_and_outbox_list_shows_it(tmp: Path) -> None:
    rx = start_mllp_receiver(["AR"])
    store = _store(tmp, hl7_port=rx.port)
    try:
        entry = _queue(store, [_oru()])[0]
        outbox.run_once(store, FAST)
        assert _entries(store)[0].state == "dead"
        _make_due(store)
        assert outbox.run_once(store, FAST) == 0
        assert rx.answered == ["AR"]
        env = {**os.environ, "MSGATE_HOME": str(store.settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0"}
        run = subprocess.run([sys.executable, "-m", "msgate", "outbox", "list", "--state", "dead", "--json"],
                             capture_output=True, text=True, timeout=120, env=env)
        assert run.returncode == 0, run.stderr
        rows = json.loads(run.stdout)
        assert [r["id"] for r in rows] == [entry]
        assert rows[0]["history"][0]["peer_status"] == "rejected" and rows[0]["destination"] == "hl7"
    finally:
        rx.stop()
        store.close()


SENDER = """
import sys, threading
from msgate.config import load_settings
from msgate.results import outbox, outbox_ops
from msgate.storage.store import open_store
store = open_store(load_settings())
outbox.run(store, threading.Event(), outbox.Policy(base_delay=0.2, max_delay=1.0, lease=3.0, poll=0.1), consume=False)
"""


def test_sender_killed_mid_send_delivers_after_restart(tmp: Path) -> None:
    scp = start_scripted_scp([], delay=0.5)
    store = _store(tmp, pacs_port=scp.port, ae="SCRIPTED")
    ids = _queue(store, _dicom(6, seed=4))
    env = {**os.environ, "MSGATE_HOME": str(store.settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
           "MSGATE_PACS": json.dumps([{"name": "pacs", "host": "127.0.0.1", "port": scp.port, "ae_title": "SCRIPTED"}])}
    proc = subprocess.Popen([sys.executable, "-c", SENDER], env=env, start_new_session=True)
    try:
        wait_until(lambda: len(scp.received) >= 2, 60)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert {e.state for e in _entries(store)} >= {"sending"}
        time.sleep(FAST.lease + 0.2)
        scp.delay = 0.0
        while outbox.run_once(store, FAST):
            pass
        entries = _entries(store)
        assert {e.state for e in entries} == {"delivered"} and {e.id for e in entries} == set(ids)
        uids = {ds.SOPInstanceUID for ds in scp.received}
        assert len(uids) == 6  # nothing lost; a resend reuses the SOP Instance UID
        interrupted = [i for i in ids if any(h[0] == "interrupted" for h in _history(store, i))]
        assert interrupted
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        scp.stop()
        store.close()


def test_a_slow_destination_does_not_hold_back_the_others(tmp: Path) -> None:
    slow = start_scripted_scp([], delay=2.0)
    fast = start_storescp(tmp / "fast")
    settings = make_settings(tmp / "home", "sqlite", pacs=[
        {"name": "slow", "host": "127.0.0.1", "port": slow.port, "ae_title": "SCRIPTED"},
        {"name": "fast", "host": "127.0.0.1", "port": fast.port, "ae_title": fast.ae_title}])
    store = open_store(settings)
    stop = threading.Event()
    role = threading.Thread(target=outbox.run, args=(store, stop, FAST), kwargs={"consume": False}, daemon=True)
    try:
        _queue(store, _dicom(4, seed=9))
        started = time.monotonic()
        role.start()

        def fast_done() -> bool:
            return all(e.state == "delivered" for e in _entries(store) if e.destination == "fast")

        wait_until(fast_done, 30, 0.05)
        assert time.monotonic() - started < 4.0  # the slow peer needs 8 s for its 4 objects
        assert any(e.state != "delivered" for e in _entries(store) if e.destination == "slow")
        wait_until(lambda: all(e.state == "delivered" for e in _entries(store)), 60)
    finally:
        stop.set()
        role.join(30)
        slow.stop()
        fast.stop()
        store.close()


def test_a_sop_class_the_peer_refuses_is_dead_lettered(tmp: Path) -> None:
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification

    ae = AE(ae_title="SCONLY")
    ae.add_supported_context(SecondaryCaptureImageStorage)
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])
    store = _store(tmp, pacs_port=port, ae="SCONLY")
    try:
        entry = _queue(store, _dicom(1))[0]  # MR Image Storage
        outbox.run_once(store, FAST)
        assert _entries(store)[0].state == "dead"
        assert _history(store, entry)[0][:2] == ("dead", "0x0122 (presentation context rejected: SOP class not supported)")
    finally:
        server.shutdown()
        store.close()
