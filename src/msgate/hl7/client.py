"""MLLP client for outbound messages (the results outbox): one reused connection, timeouts, MSA-1.

A connection the peer closed after its last answer is noticed before the next send and reopened.

Only ``AA`` and ``CA`` are success. ``AE``/``CE``, a timeout, a dropped connection or an answer that
cannot be read are :class:`~msgate.errors.Transient` (retry later); ``AR``/``CR`` are
:class:`~msgate.errors.Rejected` (permanent). Only an ACK whose MSA-2 echoes our MSH-10 answers a
message: ACKs of other messages are skipped until the timeout (then Transient), and an ACK without
MSA-2 is Transient (code ``ack_mismatch``). When the timeout runs out after the engine answered this
message only with ACKs for control ids msgate never sent on the connection (an ACK template that fills
MSA-2 from the engine's own MSH-10), it is :class:`AckMismatch` (code ``ack_mismatch``, a warning logged):
the engine answers, so "no answer" would send the analyst the wrong way. ACKs of messages sent earlier
on the connection (a late or repeated ACK, an application ACK after its commit ACK) are not counted.

Why an engine refused (or warned about) a message is read from the ACK (:func:`read_ack`): its coded
parts (MSA-1, ERR-3 HL7 error code, ERR-4 severity, ERR-5 application error code, ERR-2 location; ERR-1
code and location from v2.3-style engines; MSA-6 before v2.5) are sanitised (:func:`code_part`) and may
go into exception messages and plaintext columns; its free text (MSA-3, the text components of ERR-3,
ERR-5, ERR-1 and MSA-6, ERR-7, ERR-8) can name the patient ("Patient DOE^JOHN not found"), so it never
does: :meth:`AckResult.peer_text` is for the caller to store encrypted. :class:`PeerRejected` and
:class:`PeerNak` carry the parsed ACK.

MLLP over TLS (IHE ATNA): with an ``ssl_context``, or ``tls`` settings that are enabled (a fresh context
per connection), the socket is wrapped right after the TCP connect and the handshake runs under the
connect timeout. A certificate that does not verify, a host name mismatch, a peer that does not speak
TLS (it resets, closes or never answers the ClientHello) and a TLS alert later on (a client certificate
the engine requires) are Transient with code ``tls`` and a message that names the problem
(:func:`msgate.config_tls.tls_failure`).
:meth:`MllpClient.for_destination` builds the client for ``[hl7_out]`` with its ``tls`` section.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from types import TracebackType

from msgate.config import Hl7Destination
from msgate.config_tls import SESSION_CLOSED, ClientTlsSettings, tls_failure
from msgate.errors import Rejected, Transient
from msgate.hl7 import mllp
from msgate.hl7.msh import HeaderError, read_msh
from msgate.hl7.parse import Message, Segment, component_of, parse, unescape

log = logging.getLogger(__name__)

CODE_CHARS = re.compile(r"[^A-Za-z0-9._\-^&]")
CODE_LIMIT = 32  # characters kept of one coded part
MAX_ERRORS = 5  # ERR segments (or v2.3 ERR-1 repetitions) read from one ACK
TEXT_LIMIT = 2000  # characters kept of one free-text field


def code_part(value: str, limit: int = CODE_LIMIT) -> str:
    """A coded value (an ACK code, an error code, a severity, a location) safe for plaintext: characters
    other than ``A-Z a-z 0-9 . _ - ^ &`` are removed (no spaces, so no names in "code" fields written as
    words) and the result is cut to ``limit``."""
    return CODE_CHARS.sub("", value)[:limit]


@dataclass(frozen=True)
class AckError:
    """One ERR segment, or one ERR-1 repetition of a v2.3-style engine (HL7 v2.5.1 2.15.5).

    The coded parts are sanitised with :func:`code_part`; ``texts`` holds (field, text) pairs that may
    contain PHI and are kept out of ``repr``."""

    hl7_code: str = ""  # ERR-3.1 (HL7 table 0357), or ERR-1.4.1
    severity: str = ""  # ERR-4 (table 0516): E, F, W, I
    app_code: str = ""  # ERR-5.1
    location: str = ""  # ERR-2 (ERL), or ERR-1.1-3: segment^sequence^field...
    texts: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def summary(self) -> str:
        parts = (("ERR-3", self.hl7_code), ("ERR-4", self.severity), ("ERR-5", self.app_code),
                 ("ERR-2", self.location))
        return ", ".join(f"{name} {value}" for name, value in parts if value)


@dataclass(frozen=True)
class AckResult:
    code: str
    control_id: str
    text: str = field(default="", repr=False)  # MSA-3: free text, may name the patient
    error_code: str = ""  # the first error's HL7 (or v2.3) error code, sanitised
    errors: tuple[AckError, ...] = ()
    condition: str = ""  # MSA-6.1 (error condition, HL7 v2.1-2.4), sanitised
    condition_text: str = field(default="", repr=False)  # MSA-6.2

    @property
    def success(self) -> bool:
        return self.code in ("AA", "CA")

    def summary(self) -> str:
        """The coded parts only (safe for logs, exception messages and plaintext columns):
        ``AR; ERR-3 204, ERR-4 E, ERR-5 NOTFOUND, ERR-2 PID^1^3``."""
        parts = [self.code or "no MSA-1 code"]
        if self.condition:
            parts.append(f"MSA-6 {self.condition}")
        parts += [s for s in (e.summary() for e in self.errors) if s]
        return "; ".join(parts)

    def peer_text(self) -> str:
        """The engine's free-text explanation, one ``FIELD: text`` line each (MSA-3, MSA-6.2, then each
        error's ERR-3.2, ERR-5.2, ERR-7, ERR-8, or ERR-1.4.2); "" when there is none. May hold PHI: store
        it encrypted, never log it."""
        lines = [("MSA-3", self.text), ("MSA-6.2", self.condition_text)]
        lines += [pair for error in self.errors for pair in error.texts]
        return "\n".join(f"{name}: {text}" for name, text in lines if text)


def _text(value: str) -> str:
    return " ".join(value.split())[:TEXT_LIMIT]  # one line: an engine's \.br\ or CR LF in ERR-8


def _free(seg: Segment, n: int) -> str:
    """A free-text field (ST/TX) whole: engines rarely escape a ``^`` in "Patient DOE^JOHN not found"."""
    return _text(unescape(seg.raw(n), seg.enc))


def _location(seg: Segment, n: int, components: int, rep: int = 0) -> str:
    parts = [seg.get(n, c, rep=rep) for c in range(1, components + 1)]
    while parts and not parts[-1]:
        parts.pop()
    return code_part("^".join(parts))


def _errors(msg: Message) -> tuple[AckError, ...]:
    """ERR segments, v2.5 (ERR-2..8) or v2.3 (ERR-1 ELD, repeating); at most :data:`MAX_ERRORS`."""
    out: list[AckError] = []
    for seg in msg.all("ERR"):
        if any(seg.raw(n) for n in (3, 4, 5, 7, 8)):  # v2.5; ERR-1 only where ERR-3 or ERR-2 is empty
            texts = (("ERR-3.2", _text(seg.get(3, 2))) if seg.raw(3) else ("ERR-1.4.2", _text(seg.get(1, 4, 2))),
                     ("ERR-5.2", _text(seg.get(5, 2))), ("ERR-7", _free(seg, 7)), ("ERR-8", _free(seg, 8)))
            out.append(AckError(code_part(seg.get(3, 1) or seg.get(1, 4, 1)),
                                code_part(seg.get(4, 1).strip().upper(), 1), code_part(seg.get(5, 1)),
                                _location(seg, 2, 6) or _location(seg, 1, 3),
                                tuple((name, text) for name, text in texts if text)))
        else:  # v2.3: ERR-1 = segment ^ sequence ^ field ^ code&text&system, one repetition per error
            for rep in range(len(seg.reps(1))):
                text = _text(component_of(seg.reps(1)[rep], seg.enc, 4, 2))
                out.append(AckError(code_part(seg.get(1, 4, 1, rep=rep)), location=_location(seg, 1, 3, rep),
                                    texts=(("ERR-1.4.2", text),) if text else ()))
    return tuple(e for e in out if e.summary() or e.texts)[:MAX_ERRORS]


def read_ack(raw: bytes) -> AckResult:
    try:
        msg = parse(raw)
    except Exception:
        raise Transient("unreadable acknowledgement", code="bad_ack") from None
    msa = msg.first("MSA")
    if msa is None:
        raise Transient("acknowledgement without MSA", code="bad_ack")
    errors = _errors(msg)
    return AckResult(code_part(msa.get(1).strip().upper(), 8), msa.get(2).strip(), _free(msa, 3),
                     next((e.hl7_code for e in errors if e.hl7_code), ""), errors,
                     code_part(msa.get(6, 1)), _text(msa.get(6, 2)))


class PeerRejected(Rejected):
    """``AR``/``CR``: the message names the ACK's coded parts only; ``ack`` is the parsed answer."""

    def __init__(self, ack: AckResult) -> None:
        super().__init__(f"peer rejected the message ({ack.summary()})", code="rejected")
        self.ack = ack


class PeerNak(Transient):
    """``AE``/``CE`` (or an MSA-1 that is no known code): retried; ``ack`` is the parsed answer."""

    def __init__(self, ack: AckResult) -> None:
        super().__init__(f"peer did not accept the message ({ack.summary()})", code="nak")
        self.ack = ack


class AckTimeout(Transient):
    """No frame arrived within the timeout (code ``io``, as any failed exchange)."""


class AckMismatch(Transient):
    """The timeout ran out, and every ACK the engine sent meanwhile named another control id in MSA-2."""

    def __init__(self, count: int, codes: str, own_id: bool, timeout: float) -> None:
        hint = "; MSA-2 equal to the ACK's own MSH-10 (the ACK template fills MSA-2 from it)" * own_id
        super().__init__(f"the engine answered {codes} for another message control id: {count} ACK(s) whose "
                         f"MSA-2 is not this message's MSH-10, none that is, within {timeout:g} s{hint}",
                         code="ack_mismatch")
        self.count = count


def _io_failure(exc: OSError, *, unanswered_tls: bool = False) -> Transient:
    """A failed read or write. A TLS alert, or a TLS session the peer closed before its first answer
    (the engine refused our client certificate, or wanted one), says so."""
    if isinstance(exc, ssl.SSLError) or (unanswered_tls and isinstance(exc, ConnectionError)):
        return Transient(tls_failure(exc, handshake=False), code="tls")
    kind = AckTimeout if isinstance(exc, TimeoutError) else Transient
    return kind(f"MLLP exchange failed ({type(exc).__name__})", code="io")


@dataclass
class _Foreign:
    """ACKs for control ids this connection never sent, while one message waits (no values kept)."""

    count: int = 0
    codes: list[str] = field(default_factory=list)
    own_id: bool = False  # one had MSA-2 equal to its own MSH-10

    def add(self, ack: AckResult, frame: bytes) -> None:
        self.count += 1
        code = ack.code or "no MSA-1 code"
        if code not in self.codes:
            self.codes.append(code)
        try:
            self.own_id = self.own_id or read_msh(frame).control_id == ack.control_id
        except HeaderError:
            pass


class MllpClient:
    """``send(message)`` returns the :class:`AckResult` of an AA/CA answer (with its ERR warnings, if any),
    or raises (:class:`PeerRejected`, :class:`PeerNak` or another Transient)."""

    def __init__(self, host: str, port: int, *, timeout: float = 30.0, connect_timeout: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None, tls: ClientTlsSettings | None = None,
                 server_hostname: str | None = None, max_ack_bytes: int = 1 << 20) -> None:
        self.host, self.port, self.timeout, self.connect_timeout = host, port, timeout, connect_timeout
        self.ssl_context, self.max_ack_bytes = ssl_context, max_ack_bytes
        self.tls = tls if tls is not None and tls.enabled else None  # a context from it per connection
        self.server_hostname = server_hostname or host  # verified and sent as SNI (ClientTlsSettings.server_name)
        self._sock: socket.socket | None = None
        self._deframer = mllp.Deframer(max_ack_bytes)
        self._frames: list[bytes] = []
        self._unanswered_tls = False  # a TLS connection with nothing received on it yet
        self._sent: set[str] = set()  # MSH-10s sent on this connection: their late ACKs are no mismatch

    @classmethod
    def for_destination(cls, dest: Hl7Destination, *, timeout: float = 30.0,
                        connect_timeout: float = 10.0) -> MllpClient:
        """The client for an ``[hl7_out]`` destination, with TLS as its ``tls`` section says. The context
        is made at each connection, so renewed certificate files are read then, and files that no longer
        load fail that send (Transient ``tls_files``), not the construction."""
        return cls(dest.host, dest.port, timeout=timeout, connect_timeout=connect_timeout, tls=dest.tls,
                   server_hostname=dest.tls.server_hostname(dest.host))

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
                self._unanswered_tls = False
                self._sent = set()

    def _connect(self) -> socket.socket:
        if self._sock is None:
            context = self.ssl_context or (self.tls.context() if self.tls is not None else None)
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            except OSError as exc:
                raise Transient(f"cannot connect to the MLLP peer ({type(exc).__name__})", code="connect") from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                sock = self._handshake(sock, context)
                self._unanswered_tls = True
            sock.settimeout(self.timeout)
            self._sock = sock
        return self._sock

    def _handshake(self, sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
        """TLS on the connected socket, the handshake bounded by the connect timeout (the socket's own)."""
        try:
            return context.wrap_socket(sock, server_hostname=self.server_hostname)
        except OSError as exc:  # wrap_socket closed the socket
            sock.close()
            raise Transient(tls_failure(exc, timeout=self.connect_timeout), code="tls") from None

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
            unanswered = self._unanswered_tls
            self.close()
            raise _io_failure(exc, unanswered_tls=unanswered) from None

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
                    if self._unanswered_tls:
                        raise Transient(SESSION_CLOSED, code="tls")
                    raise Transient("peer closed the connection before acknowledging", code="closed")
                self._unanswered_tls = False
                self._frames.extend(e.payload for e in self._deframer.feed(data) if e.kind == "frame")
        except (OSError, Transient) as exc:
            unanswered = self._unanswered_tls
            self.close()
            if isinstance(exc, Transient):
                raise
            raise _io_failure(exc, unanswered_tls=unanswered) from None
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
        self._sent.add(control_id)
        deadline = time.monotonic() + self.timeout
        foreign = _Foreign()
        while True:
            try:
                frame = self._next_frame(deadline)
            except AckTimeout:
                if not foreign.count:
                    raise
                raise self._mismatch(foreign) from None
            ack = read_ack(frame)
            if ack.control_id == control_id:
                break
            if not ack.control_id:  # MSA-2 is required (HL7 v2 2.14.8): no proof of which message it answers
                self.close()
                raise Transient("acknowledgement without MSA-2 (control id)", code="ack_mismatch")
            if ack.control_id not in self._sent:
                foreign.add(ack, frame)
        if ack.success:
            return ack
        if ack.code in ("AR", "CR"):
            raise PeerRejected(ack)
        raise PeerNak(ack)

    def _mismatch(self, foreign: _Foreign) -> AckMismatch:
        """The engine answered, but never for this message: logged (coded parts only, no MSA-2 value)."""
        codes = "/".join(foreign.codes)
        log.warning("the engine acknowledged only other control ids (MSA-2 is not the MSH-10 sent); check "
                    "its ACK template", extra={"code": "ack_mismatch", "count": foreign.count, "ack": codes,
                                               "host": self.host, "port": self.port})
        return AckMismatch(foreign.count, codes, foreign.own_id, self.timeout)
