"""The indexer process behind the ACK path: killed, it is started again and loses nothing; the server's
death ends it; a clean stop leaves an empty journal."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from hl7_helpers import (
    RawClient,
    free_port,
    make_store,
    msa,
    open_home_store,
    running_server,
    start_serve,
    wait_mapped,
)
from sqlmodel import func, select

from msgate.hl7 import mllp
from msgate.hl7.client import MllpClient
from msgate.storage.models import Hl7Message

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def message(i: int, enhanced: bool = False) -> bytes:
    msh15 = "|||AL|AL" if enhanced else ""
    return (f"MSH|^~\\&|LAB|HOSP|MSGATE|MSGATE|20250101120000||ORU^R01^ORU_R01|IX{i:05d}|P|2.5.1{msh15}\r"
            f"PID|1||M{i % 7}^^^HOSP^MR||DOE^JANE||19800101|F\r"
            f"OBR|1|P{i}|F{i}|1234-5^Test^LN|||20250101110000\r"
            f"OBX|1|NM|101281-4^NfL^LN||{i % 40}.5|pg/mL|||||F|||20250101{i % 24:02d}0000\r").encode()


def _counts(store) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    with store.db.session() as session:
        total = session.exec(select(func.count()).select_from(Hl7Message)).one()
        most = session.exec(select(func.max(Hl7Message.duplicates))).one() or 0
    return total, most


def test_killed_indexer_is_restarted_and_nothing_is_lost(tmp_path: Path) -> None:
    store = make_store(tmp_path / "home")
    with running_server(store) as srv:
        first = srv.indexer.proc
        with MllpClient("127.0.0.1", srv.port, timeout=10) as client:
            for i in range(300):
                assert client.send(message(i)).code == "AA"
                if i == 150:
                    os.kill(first.pid, signal.SIGKILL)  # answers go on: the ACK path does not need it
        deadline = time.monotonic() + 60
        while srv.indexer.proc is first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.indexer.proc is not first and srv.indexer.restarts == 1
        raw = RawClient(srv.port)  # the application ACK comes through the new indexer
        try:
            raw.send(mllp.frame(message(300, enhanced=True)))
            assert msa(raw.recv_frame())[1] == "CA"
            raw.sock.settimeout(120)  # after the backlog the new indexer inherited is mapped
            assert msa(raw.recv_frame())[1] == "AA"
        finally:
            raw.close()
        wait_mapped(store, 301, timeout=60)
        assert _counts(store) == (301, 0)  # each exactly once: nothing stored twice across the restart
    assert list((tmp_path / "home" / "hl7-journal").glob("*.jnl")) == []  # a clean stop drains the journal
    store.close()


def test_an_indexer_that_fails_to_start_again_is_retried(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The indexer dies, and its replacement cannot be started (no descriptors left) or dies before it
    is ready: the supervisor tries again. Its follower used to end on that error, and from then on the
    feed answered AA with nothing indexed behind it until the server was restarted."""
    from msgate.hl7 import supervisor

    real, attempts = supervisor.IndexerProcess._popen, []

    def flaky(self, theirs):  # type: ignore[no-untyped-def]
        attempts.append(1)
        if len(attempts) == 2:
            raise OSError(24, "Too many open files")
        return real(self, theirs)

    monkeypatch.setattr(supervisor.IndexerProcess, "_popen", flaky)
    store = make_store(tmp_path / "home")
    with running_server(store) as srv:
        os.kill(srv.indexer.proc.pid, signal.SIGKILL)
        with MllpClient("127.0.0.1", srv.port, timeout=10) as client:
            for i in range(20):
                assert client.send(message(i)).code == "AA"
        wait_mapped(store, 20, timeout=60)
        assert len(attempts) == 3 and srv.indexer.restarts == 2
    store.close()


def test_a_resent_message_gets_its_application_ack(tmp_path: Path) -> None:
    """Enhanced mode (MSH-15/16 AL): the connection was lost before the application ACK, so the sender
    resends. The resend is a duplicate; it used to get its CA and then never an application ACK."""
    store = make_store(tmp_path / "home")
    with running_server(store) as srv:
        first = RawClient(srv.port)
        first.send(mllp.frame(message(1, enhanced=True)))
        assert msa(first.recv_frame())[1:3] == ["CA", "IX00001"]
        first.close()  # before the application ACK
        wait_mapped(store, 1)
        again = RawClient(srv.port, timeout=20)
        try:
            again.send(mllp.frame(message(1, enhanced=True)))
            assert msa(again.recv_frame())[1:3] == ["CA", "IX00001"]
            assert msa(again.recv_frame())[1:3] == ["AA", "IX00001"]  # the stored row's mapping outcome
        finally:
            again.close()
        assert _counts(store) == (1, 1)  # stored once, the resend counted as a duplicate
    store.close()


def test_indexer_ends_when_the_server_is_killed(tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    proc = start_serve(home, port)
    children = _children(proc.pid)
    assert children, "the hl7 role runs an indexer process"
    with MllpClient("127.0.0.1", port, timeout=10) as client:
        for i in range(50):
            assert client.send(message(i)).code == "AA"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in children)  # no orphan left writing next to the next server
    proc = start_serve(home, port)  # indexes what the journal held
    try:
        store = open_home_store(home)
        assert _counts(store) == (50, 0)
        store.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
