"""A scripted interface engine on a real MLLP socket, for the outbox tests: it records every message it
receives and answers each with what :meth:`MllpPeer.answer` returns (None: files it, never answers)."""

from __future__ import annotations

import socket
import threading
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Self

from msgate.hl7 import mllp


def control_id(message: bytes) -> bytes:
    """MSH-10 of a message."""
    return message.split(b"\r")[0].split(b"|")[9]


@dataclass(kw_only=True)
class MllpPeer:
    """``close_after_ack``: one message per connection (a Mirth TCP listener with "keep connection open"
    off). ``connections`` counts the connections accepted."""

    close_after_ack: bool = False
    received: list[bytes] = field(default_factory=list)
    connections: int = 0
    srv: socket.socket = field(default_factory=socket.socket)
    stopping: threading.Event = field(default_factory=threading.Event)

    def answer(self, message: bytes) -> bytes | None:
        raise NotImplementedError

    def start(self) -> Self:
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.srv.settimeout(0.1)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        return int(self.srv.getsockname()[1])

    def control_ids(self) -> list[str]:
        return [control_id(m).decode() for m in self.received]

    def stop(self) -> None:
        self.stopping.set()
        self.srv.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.srv.accept()
            except OSError:  # the accept timeout, or stop() closed the socket
                continue
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        deframer = mllp.Deframer(1 << 20)
        conn.settimeout(10)
        with conn, suppress(OSError):
            while data := conn.recv(65536):
                for message in [e.payload for e in deframer.feed(data) if e.kind == "frame"]:
                    self.received.append(message)
                    reply = self.answer(message)
                    if reply is None:
                        continue
                    conn.sendall(mllp.frame(reply))
                    if self.close_after_ack:
                        return
