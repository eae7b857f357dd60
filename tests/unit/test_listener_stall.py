"""The data phase's reads on a socket with a timeout (the network timeout the server sets per connection):
a peer silent inside a PDU ends the association (Evt17) with one log line naming only its address."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from types import SimpleNamespace

import pytest

from msgate.listener.dataphase import DataPhase


class _Events:
    def __init__(self) -> None:
        self.items: list[str] = []

    def put(self, item: str) -> None:
        self.items.append(item)


def _phase(events: _Events) -> DataPhase:
    assoc = SimpleNamespace(requestor=SimpleNamespace(address="192.0.2.7"))
    return DataPhase(SimpleNamespace(event_queue=events, assoc=assoc), store=lambda *args: 0)


def test_a_peer_silent_mid_pdu_is_dropped_after_the_socket_timeout(caplog: pytest.LogCaptureFixture) -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        ours.settimeout(0.3)
        peer.sendall(struct.pack(">BBL", 0x04, 0x00, 1000) + b"\x00" * 10)  # 1000 announced, 10 sent
        events = _Events()
        phase = _phase(events)
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="msgate.listener.dataphase"):
            header = phase._recv(ours, 6)
            assert header is not None
            assert phase._recv(ours, struct.unpack(">BBL", header)[2]) is None
        assert 0.25 < time.monotonic() - started < 2.0
        assert events.items == ["Evt17"]
        messages = [(r.getMessage(), getattr(r, "peer", None), getattr(r, "reason", None))
                    for r in caplog.records]
        assert messages == [("association aborted: peer stalled mid-PDU", "192.0.2.7",
                             "no data for 0.3 s (network timeout)")]


def test_a_peer_that_keeps_sending_slowly_is_read_to_the_end() -> None:
    """The timeout is on each wait for data, not on the whole PDU."""
    ours, peer = socket.socketpair()
    with ours, peer:
        ours.settimeout(0.3)
        events = _Events()
        phase = _phase(events)
        def trickle() -> None:
            for _ in range(4):  # 0.8 s in all, each gap under the 0.3 s timeout
                peer.sendall(b"\x01" * 25)
                time.sleep(0.2)

        thread = threading.Thread(target=trickle)
        thread.start()
        body = phase._recv(ours, 100)
        thread.join()
        assert body == bytearray(b"\x01" * 100)
        assert events.items == []


def test_a_peer_closing_between_pdus_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    ours, peer = socket.socketpair()
    with ours:
        ours.settimeout(0.3)
        peer.close()
        events = _Events()
        with caplog.at_level(logging.INFO, logger="msgate.listener.dataphase"):
            assert _phase(events)._recv(ours, 6, quiet_eof=True) is None
        assert events.items == ["Evt17"]
        assert caplog.records == []
