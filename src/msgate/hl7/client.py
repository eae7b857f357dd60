"""MLLP client for outbound messages (the results outbox): one reused connection, timeouts, MSA-1.

A connection the peer closed after its last answer is noticed before the next send and reopened.

Only ``AA`` and ``CA`` are success. ``AE``/``CE``, a timeout, a dropped connection or an answer that
cannot be read are :class:`~msgate.errors.Transient` (retry later); ``AR``/``CR`` are
:class:`~msgate.errors.Rejected` (permanent). Only an ACK whose MSA-2 echoes our MSH-10 answers a
message: ACKs of other messages are skipped until the timeout (then Transient), and an ACK without
MSA-2 is Transient.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from types import TracebackType

from msgate.errors import Rejected, Transient
from msgate.hl7 import mllp
from msgate.hl7.msh import HeaderError, read_msh
from msgate.hl7.parse import parse


@dataclass(frozen=True)
class AckResult:
    code: str
    control_id: str
    text: str = ""
    error_code: str = ""


def read_ack(raw: bytes) -> AckResult:
    try:
        msg = parse(raw)
    except Exception:
        raise Transient("unreadable acknowledgement", code="bad_ack") from None
    msa = msg.first("MSA")
    if msa is None:
        raise Transient("acknowledgement without MSA", code="bad_ack")
    err = msg.first("ERR")
    error_code = (err.get(3, 1) or err.get(1, 4, 1)) if err is not None else ""
    return AckResult(msa.get(1).strip().upper(), msa.get(2).strip(), msa.get(3), error_code)


class MllpClient:
    """``send(message)`` returns the :class:`AckResult` of an AA/CA answer, or raises."""

    def __init__(self, host: str, port: int, *, timeout: float = 30.0, connect_timeout: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None, max_ack_bytes: int = 1 << 20) -> None:
        self.host, self.port, self.timeout, self.connect_timeout = host, port, timeout, connect_timeout
        self.ssl_context, self.max_ack_bytes = ssl_context, max_ack_bytes
        self._sock: socket.socket | None = None
        self._deframer = mllp.Deframer(max_ack_bytes)
        self._frames: list[bytes] = []

    def __enter__(self) -> MllpClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._deframer = mllp.Deframer(self.max_ack_bytes)
                self._frames = []

    def _connect(self) -> socket.socket:
        if self._sock is None:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            except OSError as exc:
                raise Transient(f"cannot connect to the MLLP peer ({type(exc).__name__})", code="connect") from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self.timeout)
            self._sock = sock
        return self._sock

    def exchange(self, message: bytes) -> bytes:
        """Send one framed message and return the next frame received (raw ACK bytes)."""
        self._send(message)
        return self._next_frame()

    def _send(self, message: bytes) -> None:
        if self._sock is not None and self._peer_closed(self._sock):
            self.close()  # reconnect below
        sock = self._connect()
        try:
            sock.sendall(mllp.frame(message))
        except OSError as exc:
            self.close()
            raise Transient(f"MLLP exchange failed ({type(exc).__name__})", code="io") from None

    def _peer_closed(self, sock: socket.socket) -> bool:
        """The peer closed (or reset) the reused connection since its last answer: an engine that closes
        after each ACK (a Mirth listener with "keep connection open" off). Sending on it used to fail
        every other message ("peer closed the connection before acknowledging"). A non-blocking read
        takes what is waiting (answers to earlier messages, kept as frames: ``send`` skips them) up to
        end of stream (closed) or nothing more (open); TLS cannot peek at the decrypted stream, so a read
        serves both. A peer that closes while the next message is on its way still gives a retry."""
        sock.setblocking(False)
        taken = 0
        try:
            while taken <= self.max_ack_bytes:  # a peer that keeps talking: left to the exchange to judge
                data = sock.recv(65536)
                if not data:
                    return True
                taken += len(data)
                self._frames.extend(e.payload for e in self._deframer.feed(data) if e.kind == "frame")
            return False
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError:
            return True
        finally:
            sock.settimeout(self.timeout)

    def _next_frame(self, deadline: float | None = None) -> bytes:
        sock = self._connect()
        try:
            while not self._frames:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    sock.settimeout(left)
                data = sock.recv(65536)
                if not data:
                    raise Transient("peer closed the connection before acknowledging", code="closed")
                self._frames.extend(e.payload for e in self._deframer.feed(data) if e.kind == "frame")
        except (OSError, Transient) as exc:
            self.close()
            if isinstance(exc, Transient):
                raise
            raise Transient(f"MLLP exchange failed ({type(exc).__name__})", code="io") from None
        finally:
            if self._sock is not None:
                self._sock.settimeout(self.timeout)
        return self._frames.pop(0)

    def send(self, message: str | bytes, *, encoding: str = "utf-8") -> AckResult:
        """Send and wait (at most the timeout) for the ACK whose MSA-2 echoes this MSH-10. Frames that
        answer other messages (a late or repeated ACK of an earlier one, an application ACK after its
        commit ACK) are skipped, never taken as this message's answer."""
        raw = message.encode(encoding) if isinstance(message, str) else message
        try:
            control_id = read_msh(raw).control_id
        except HeaderError:
            raise Rejected("outbound message has no readable MSH", code="bad_message") from None
        if not control_id:
            raise Rejected("outbound message has no MSH-10 control id", code="bad_message")
        self._frames.clear()  # answers that arrived for earlier messages
        self._send(raw)
        deadline = time.monotonic() + self.timeout
        while True:
            ack = read_ack(self._next_frame(deadline))
            if ack.control_id == control_id:
                break
            if not ack.control_id:  # MSA-2 is required (HL7 v2 2.14.8): no proof of which message it answers
                self.close()
                raise Transient("acknowledgement without MSA-2 (control id)", code="ack_mismatch")
        if ack.code in ("AA", "CA"):
            return ack
        if ack.code in ("AR", "CR"):
            raise Rejected(f"peer rejected the message ({ack.code} {ack.error_code})".strip(), code="rejected")
        raise Transient(f"peer answered {ack.code or 'nothing usable'} ({ack.error_code})", code="nak")
