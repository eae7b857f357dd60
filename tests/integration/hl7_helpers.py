"""Shared helpers for the HL7 integration tests: an in-process server on port 0, a store, a raw client."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from msgate.config import load_settings
from msgate.hl7 import mllp
from msgate.hl7.server import Hl7Server
from msgate.storage.store import Store, open_store

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
CONFORMANCE = SHARED / "conformance" / "hl7"


def make_store(home: Path, **hl7: object) -> Store:
    settings = load_settings(home=home, storage={"min_free_bytes": 0}, metrics={"enabled": False},
                             hl7={"port": 0, **hl7})
    return open_store(settings)


@contextmanager
def running_server(store: Store) -> Iterator[Hl7Server]:
    loop = asyncio.new_event_loop()
    server = Hl7Server(store)
    ready = threading.Event()

    def target() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


class RawClient:
    """A plain socket client that sends bytes and reads framed answers (for bad-input tests)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.deframer = mllp.Deframer(1 << 24)
        self.frames: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self) -> bytes:
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.frames.extend(e.payload for e in self.deframer.feed(data) if e.kind == "frame")
        return self.frames.pop(0)

    def exchange(self, message: bytes) -> bytes:
        self.send(mllp.frame(message))
        return self.recv_frame()

    def close(self) -> None:
        self.sock.close()


def msa(ack: bytes) -> list[str]:
    """MSA fields of an ACK (default or the ACK's own field separator)."""
    text = ack.decode("utf-8", "replace")
    sep = text[3] if text.startswith(("MSH", "BHS", "FHS")) else "|"
    for line in text.split("\r"):
        if line.startswith("MSA"):
            return line.split(sep)
    raise AssertionError("no MSA in answer")


def err(ack: bytes) -> list[str]:
    text = ack.decode("utf-8", "replace")
    sep = text[3]
    return next((line.split(sep) for line in text.split("\r") if line.startswith("ERR")), [])


def wait_mapped(store: Store, count: int, timeout: float = 30.0) -> None:
    import time

    from sqlmodel import func, select

    from msgate.storage.models import Hl7Message

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with store.db.session() as session:
            pending = session.exec(select(func.count()).select_from(Hl7Message)
                                   .where(Hl7Message.mapping_state == "pending")).one()
            total = session.exec(select(func.count()).select_from(Hl7Message)).one()
        if total >= count and pending == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"mapping did not finish: {total} stored, {pending} pending")


def wait_row(store: Store, header: object, raw: bytes, timeout: float = 30.0) -> None:
    """Wait until the message with this header is stored and no longer pending mapping."""
    import time

    from sqlmodel import select

    from msgate.storage.models import Hl7Message

    key = store.ingest.dedup_key(header, raw)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with store.db.session() as session:
            row = session.exec(select(Hl7Message).where(Hl7Message.dedup_index == key)).first()
        if row is not None and row.mapping_state != "pending":
            return
        time.sleep(0.05)
    raise AssertionError("message not stored and mapped in time")


REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(__import__("sys").executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    env.update(MSGATE_HOME=str(home), MSGATE_HL7__PORT=str(port), MSGATE_STORAGE__MIN_FREE_BYTES="0",
               MSGATE_METRICS__ENABLED="false", **extra)
    return env


def start_serve(home: Path, port: int, **extra: str):  # type: ignore[no-untyped-def]
    """``msgate serve --role hl7`` as a subprocess (``extra``: more MSGATE_* variables); returns once the
    port accepts connections."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "msgate", "serve", "--role", "hl7"], env=serve_env(home, port, **extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start")


def open_home_store(home: Path) -> Store:
    settings = load_settings(home=home, storage={"min_free_bytes": 0}, metrics={"enabled": False})
    return open_store(settings, create_keys=False)
