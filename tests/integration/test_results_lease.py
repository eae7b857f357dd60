"""Two publish senders on PostgreSQL share the outbox: an entry that waited in one sender's batch past
its lease, and was taken by the other sender, reaches the EHR once (over a real MLLP socket)."""

from __future__ import annotations

import collections
import socket
import threading
import time
from pathlib import Path

import pytest

from msgate.results import outbox
from msgate.storage import keyring
from msgate.storage.models import Job, Study
from msgate.storage.store import open_store
from tests.conftest import free_port, make_settings

pytestmark = [pytest.mark.integration]

ORU = (b"MSH|^~\\&|MSGATE|H|EHR|H|20260101000000||ORU^R01|X|P|2.5.1\rPID|1||MRN1\r"
       b"OBR|1||ACC1\rOBX|1|NM|EDSS||2.0\r")


def _slow_ehr(port: int, received: list[bytes], stop: threading.Event) -> None:
    """An MLLP peer that answers AA one second after each message."""
    server = socket.create_server(("127.0.0.1", port))
    server.settimeout(0.2)

    def serve(conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while not stop.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
                while b"\x1c\r" in buffer:
                    frame, buffer = buffer.split(b"\x1c\r", 1)
                    control = frame.lstrip(b"\x0b").split(b"\r")[0].split(b"|")[9]
                    received.append(control)
                    time.sleep(1.0)
                    ack = b"MSH|^~\\&|EHR|H|MSGATE|H|20260101||ACK|A1|P|2.5.1\rMSA|AA|" + control + b"\r"
                    conn.sendall(b"\x0b" + ack + b"\x1c\r")

    with server:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()


def test_an_entry_taken_over_after_its_lease_is_sent_once(tmp_path: Path, pg_url: str) -> None:
    port, home = free_port(), tmp_path / "home"
    keyring.init(home / "keys" / "keyring.json")
    store = open_store(make_settings(home, "postgres", pg_url, hl7_out={"port": port}))
    received: list[bytes] = []
    stop = threading.Event()
    threading.Thread(target=_slow_ehr, args=(port, received, stop), daemon=True).start()
    try:
        with store.db.session() as session:
            study = Study(study_uid_index="idx-1")
            session.add(study)
            session.flush()
            job = Job(study_id=study.id, idem_key="k", state="done")
            session.add(job)
            session.flush()
            for _ in range(5):
                outbox.enqueue(store, session, job_id=job.id, objects=[outbox.Rendered("out.oru", ORU)])
        policy = outbox.Policy(lease=2.0, batch=50, hl7_timeout=5.0, poll=0.1)  # 5 sends of 1 s each
        sender_a = threading.Thread(target=outbox.run_once, args=(store, policy))
        sender_a.start()
        time.sleep(2.3)  # A's lease on the entries still waiting in its batch has run out
        taken, deadline = 0, time.monotonic() + 10
        while not taken and time.monotonic() < deadline:  # sender B takes them
            taken = outbox.run_once(store, policy)
            time.sleep(0.1)
        sender_a.join(30)
        assert taken
        per_entry = collections.Counter(control[2:14] for control in received)  # MSH-10: MG + entry id + attempt
        assert len(per_entry) == 5 and set(per_entry.values()) == {1}, per_entry
    finally:
        stop.set()
        store.close()
