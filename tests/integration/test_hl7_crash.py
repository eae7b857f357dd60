"""Crash test: SIGKILL the server while a client streams 2,000 messages; restart; resend the unacknowledged.

Every acknowledged message must be stored exactly once, and after the resend all 2,000 are stored once.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from hl7_helpers import free_port, open_home_store, start_serve
from sqlmodel import func, select

from msgate.errors import Transient
from msgate.hl7.client import MllpClient
from msgate.storage.ingest import Hl7Header
from msgate.storage.models import Hl7Message

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TOTAL = 2000


def message(i: int) -> bytes:
    return (f"MSH|^~\\&|LAB|HOSP|MSGATE|MSGATE|20250101120000||ORU^R01^ORU_R01|CR{i:05d}|P|2.5.1\r"
            f"PID|1||M{i % 50}^^^HOSP^MR||DOE^JANE||19800101|F\r"
            f"OBR|1|P{i}|F{i}|1234-5^Test^LN|||20250101110000\r"
            f"OBX|1|NM|101281-4^NfL^LN||{i % 40}.5|pg/mL|||||F|||20250101110000\r").encode()


def test_sigkill_mid_stream_loses_no_acknowledged_message(tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    proc = start_serve(home, port)
    acked: list[int] = []

    def stream() -> None:
        with MllpClient("127.0.0.1", port, timeout=10) as client:
            for i in range(TOTAL):
                try:
                    client.send(message(i))
                except Transient:
                    return
                acked.append(i)

    thread = threading.Thread(target=stream)
    thread.start()
    while len(acked) < 700 and thread.is_alive():
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)  # while the client is mid-stream
    thread.join(120)
    assert not thread.is_alive() and 700 <= len(acked) < TOTAL  # the stream ended on the kill, mid-way
    proc.wait(10)
    proc = start_serve(home, port)  # indexes what the journal holds before it listens
    try:
        store = open_home_store(home)
        with store.db.session() as session:
            keys = set(session.exec(select(Hl7Message.dedup_index)).all())
        for i in acked:  # every acknowledged message is durable
            header = Hl7Header(control_id=f"CR{i:05d}", sending_application="LAB", sending_facility="HOSP")
            assert store.ingest.dedup_key(header, message(i)) in keys
        store.close()
        done = set(acked)
        with MllpClient("127.0.0.1", port, timeout=10) as client:
            for i in range(TOTAL):
                if i not in done:
                    assert client.send(message(i)).code == "AA"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    store = open_home_store(home)
    with store.db.session() as session:
        assert session.exec(select(func.count()).select_from(Hl7Message)).one() == TOTAL  # each exactly once
        assert session.exec(select(func.max(Hl7Message.duplicates))).one() <= 1
    store.close()
