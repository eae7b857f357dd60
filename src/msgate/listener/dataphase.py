"""The C-STORE data phase, received and answered in the association's DUL thread.

pynetdicom hands every P-DATA-TF PDU through its state machine, a DIMSE decoder (pydicom objects for
each command set), a queue, the association reactor thread, the event system and back, reading the
socket 4 KiB at a time. For a store-only acceptor that path costs more than the storage itself
(reference/peer-baselines.md: pynetdicom spends ~3 ms of CPU per instance; Orthanc 2 ms in total).

Here pynetdicom still does everything around the data phase: association negotiation (access control,
TLS, presentation contexts), release, abort, timers and every other PDU. Only a P-DATA-TF PDU that
arrives while the association is established (Sta6) is read here, in one ``recv_into`` loop, and its
presentation data values are assembled directly:

- a C-STORE-RQ on an accepted presentation context is collected, handed to ``store`` (which
  persists it and returns the DIMSE status: persist-then-acknowledge is the store's contract), and
  answered with a C-STORE-RSP sent on the socket by this same thread;
- any other message (C-ECHO, an unknown command, a command on an unknown context, a malformed PDU
  before the command is known) is replayed into pynetdicom's own path, PDU by PDU and in order, and the
  association stays on that path from then on; pynetdicom answers it as it always does;
- a protocol violation (a command fragment inside a dataset, a dataset or a command fragment on another
  context than the message's, a request other than C-STORE, C-ECHO or C-CANCEL) raises, and pynetdicom's
  DUL loop aborts the association (A-ABORT);
- a PDU longer than we accept (a P-DATA-TF over the maximum PDU we announced, any other PDU over
  :data:`ASSOCIATION_PDU_MAX`) is refused before its body is read or allocated (A-ABORT);
- after a refused PDU (too long, unknown type, undecodable), and whenever the association waits for the
  connection to close (Sta13), nothing the peer sends is taken for a PDU: it is dropped unread, at most
  :data:`DISCARD_MAX` bytes, then the connection is closed; a refusal is logged once per connection;
- an A-RELEASE-RQ first calls ``before_release`` (the listener waits there until the association's
  instances are indexed), then goes to pynetdicom, which answers it;
- a peer silent for the socket's timeout (the network timeout, set once per connection by the server)
  in the middle of a PDU, or not reading a C-STORE-RSP for as long, is taken as gone (Evt17: the
  connection is closed and the association ends, its slot freed) and logged once. pynetdicom's own
  network timeout is only checked between PDUs, so without it such a peer (switched off, cable pulled,
  a NAT that dropped the flow) held the association for good. The partial message is never stored or
  acknowledged; what was acknowledged before is already in the journal.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

from msgate.listener import pdata

log = logging.getLogger(__name__)

ASSOCIATION_PDU_MAX = 1 << 20  # A-ASSOCIATE-RQ and the other non-data PDUs: real ones are a few KiB
UNLIMITED_PDATA_MAX = 64 << 20  # the maximum PDU announced (and accepted) when max_pdu is 0 ("unlimited")
DISCARD_MAX = 1 << 20  # bytes dropped after a refused PDU before the connection is closed
HEADER_SLACK = 6  # tolerated excess over our maximum PDU (peers that count the 6-byte PDU header in it)

# (Part-10 bytes, association, transfer syntax, (Affected SOP Class UID, Affected SOP Instance UID)) -> status
StoreFn = Callable[[bytes, Any, str, tuple[str, str]], int]
ReleaseFn = Callable[[Any], None]  # called with the association before its A-RELEASE-RQ is processed


class ProtocolViolation(Exception):
    """The peer broke PS3.8 §9.3.5 inside a message this path had accepted."""


class DataPhase:
    """Replaces one acceptor DUL's ``_read_pdu_data`` (installed before its thread starts)."""

    def __init__(self, dul: Any, store: StoreFn, before_release: ReleaseFn | None = None) -> None:
        self.dul, self.store, self.before_release = dul, store, before_release
        self.active = True
        self.contexts: dict[int, str] | None = None  # accepted context ID -> transfer syntax
        self.discarded = -1  # bytes dropped since a PDU was refused; -1: none refused
        self._reset()

    def _reset(self) -> None:
        self.pending: list[bytes] = []  # the PDVs (each as a PDU) of the message whose command is not decoded yet
        self.command_parts: list[bytes] = []
        self.command: pdata.Command | None = None
        self.context_id = -1
        self.parts: list[memoryview] = []

    # --- socket --------------------------------------------------------------------------------------

    def read_pdu_data(self) -> None:
        sock = self.dul.socket.socket
        if self.discarded >= 0 or self.dul.state_machine.current_state == "Sta13":
            self._discard(sock)  # refused, or waiting for the close: nothing received now changes it
            return
        header = self._recv(sock, 6, quiet_eof=True)
        if header is None:
            return
        try:
            pdu_type, _, length = struct.unpack(">BBL", header)
        except struct.error:
            self.dul.event_queue.put("Evt17")
            return
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            self._refuse("unknown PDU type received: association aborted", _not_dicom(header))
            return
        if length > self._limit(pdu_type):
            self._refuse("PDU longer than this listener accepts: association aborted",
                         f"type 0x{pdu_type:02X}, {length} bytes")
            return
        body = self._recv(sock, length)
        if body is None:
            return
        if pdu_type == 0x04 and self.active and self.dul.state_machine.current_state == "Sta6":
            self._on_pdata(header, body)
            return
        if pdu_type == 0x05 and self.before_release is not None:
            self.before_release(self.dul.assoc)
        self._to_pynetdicom(bytes(header) + bytes(body))

    def _limit(self, pdu_type: int) -> int:
        """The largest PDU length accepted: a P-DATA-TF up to the maximum we announced (PS3.8 D.1: the
        peer must not send more), anything else up to :data:`ASSOCIATION_PDU_MAX`. The body is read into
        a buffer of the declared size, so an unchecked length let one 6-byte header, before any access
        control, make the listener allocate gigabytes."""
        if pdu_type != 0x04:
            return ASSOCIATION_PDU_MAX
        ours = int(getattr(getattr(self.dul.assoc, "acceptor", None), "maximum_length", 0) or 0)
        return ours + HEADER_SLACK if ours else UNLIMITED_PDATA_MAX

    def _refuse(self, message: str, reason: str) -> None:
        """An invalid PDU (Evt19: pynetdicom answers with A-ABORT and waits for the close). Before, the
        peer's next bytes were read as further 6-byte PDU headers, each one logged and answered again: a
        TLS ClientHello or an HTTP health check on the plain port logged dozens of ERRORs, 4 MiB of junk
        9,370 lines. From here on :meth:`_discard` drops them unread; this is the one log line."""
        if self.discarded >= 0:  # a second PDU of a message replayed into pynetdicom
            return
        log.error(message, extra={"reason": reason, "peer": _peer(self.dul.assoc)})
        self.dul.event_queue.put("Evt19")
        self.discarded = 0

    def _discard(self, sock: socket.socket) -> None:
        """Drop what the peer sent after a refused PDU (pynetdicom calls here only when the socket is
        readable). Its end, or more than :data:`DISCARD_MAX` bytes, closes the connection (Evt17)."""
        self.discarded = max(self.discarded, 0)
        try:
            n = sock.recv(65536)
        except (OSError, TimeoutError):
            n = b""
        self.discarded += len(n)
        if not n or self.discarded > DISCARD_MAX:
            self.dul.socket.close()

    def _recv(self, sock: socket.socket, size: int, *, quiet_eof: bool = False) -> bytearray | None:
        """Exactly ``size`` bytes, or None after queueing Evt17 (connection closed or timed out). The peer
        closing between PDUs (``quiet_eof``, nothing read) is the normal end of a connection, not an error."""
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        try:
            while got < size:
                n = sock.recv_into(view[got:], size - got)
                if n == 0:
                    break
                got += n
        except TimeoutError:
            log.error("association aborted: peer stalled mid-PDU",
                      extra={"peer": _peer(self.dul.assoc), "reason": _silent_for(sock)})
            got = -2
        except OSError:
            got = -1
        if got != size:
            if got != -2 and not (quiet_eof and got == 0):
                log.error("connection closed before the entire PDU was received")
            self.dul.event_queue.put("Evt17")
            return None
        return buf

    def _to_pynetdicom(self, raw: bytes) -> None:
        """pynetdicom's own handling of a received PDU (``DULServiceProvider._read_pdu_data``)."""
        try:
            pdu, event = self.dul._decode_pdu(raw)
        except Exception:
            self._refuse("unable to decode the received PDU data: association aborted",
                         f"type 0x{raw[0]:02X}")
            return
        self.dul.event_queue.put(event)
        self.dul._recv_pdu.put(pdu)

    # --- P-DATA-TF -----------------------------------------------------------------------------------

    def _on_pdata(self, header: bytearray, body: bytearray) -> None:
        """One P-DATA-TF PDU. Its PDVs may end one message and start the next (PS3.8 §9.3.5.1 allows
        fragments of several messages in one PDU), so a message handed to pynetdicom is replayed from
        its own PDVs, never from whole PDUs that also carried the end of a message answered here."""
        try:
            pdvs = pdata.split_pdvs(memoryview(body))
        except pdata.MalformedPdu:
            if self.command is not None:
                raise ProtocolViolation("malformed P-DATA-TF inside a C-STORE data set") from None
            self.pending.append(bytes(header) + bytes(body))
            self._fall_back()
            return
        for index, pdv in enumerate(pdvs):
            if self.command is None:
                self.pending.append(pdv.pdu())
                if not self._on_command_fragment(pdv):
                    self._fall_back(pdvs[index + 1:])
                    return
            elif pdv.is_command or pdv.context_id != self.context_id:
                raise ProtocolViolation("C-STORE data set interrupted by a command or another context")
            else:
                self.parts.append(pdv.data)
                if pdv.is_last:
                    self._answer()

    def _on_command_fragment(self, pdv: pdata.Pdv) -> bool:
        """Collect the command; once complete, take it (True) or hand the message to pynetdicom (False).
        A command whose fragments change context, or a request this store-only listener does not serve
        (N-CREATE, N-ACTION, ... which pynetdicom would answer as a C-STORE on a storage context),
        aborts the association."""
        if self.command_parts and pdv.context_id != self.context_id:
            raise ProtocolViolation("command fragments on two presentation contexts")
        if not pdv.is_command:
            return False
        self.context_id = pdv.context_id
        self.command_parts.append(bytes(pdv.data))
        if not pdv.is_last:
            return True
        try:
            command = pdata.decode_command(b"".join(self.command_parts))
        except pdata.MalformedPdu:
            return False
        if command.field not in pdata.SERVED:
            raise ProtocolViolation(f"DIMSE request 0x{command.field:04X} is not served here")
        if (command.field != pdata.C_STORE_RQ or command.dataset_type == pdata.NO_DATASET
                or self.context_id not in self._contexts()):
            return False
        self.command, self.pending = command, []
        return True

    def _contexts(self) -> dict[int, str]:
        if self.contexts is None:
            self.contexts = {int(cx.context_id): str(cx.transfer_syntax[0])
                             for cx in self.dul.assoc.accepted_contexts}
        return self.contexts

    def _fall_back(self, rest: list[pdata.Pdv] | None = None) -> None:
        """Replay the current message (and ``rest``, the PDVs after it in the same PDU) into pynetdicom,
        and leave the association on its path."""
        self.active = False
        pending = self.pending + [pdv.pdu() for pdv in rest or ()]
        self._reset()
        for raw in pending:
            self._to_pynetdicom(raw)

    def _answer(self) -> None:
        command, context_id = self.command, self.context_id
        assert command is not None
        syntax = self._contexts()[context_id]
        meta = pdata.file_meta(sop_class_uid=command.sop_class_uid, sop_instance_uid=command.sop_instance_uid,
                               transfer_syntax=syntax)
        data = b"".join((meta, *self.parts))
        self._reset()
        status = self.store(data, self.dul.assoc, syntax, (command.sop_class_uid, command.sop_instance_uid))
        del data
        rsp = pdata.encode_store_rsp(command, status)
        max_pdu = int(getattr(self.dul.assoc.requestor, "maximum_length", 0) or 0)
        try:
            for pdu in pdata.command_pdus(context_id, rsp, max_pdu):
                self.dul.socket.socket.sendall(pdu)
        except TimeoutError:
            log.error("association aborted: peer stopped reading (C-STORE-RSP not delivered)",
                      extra={"peer": _peer(self.dul.assoc)})
            self.dul.event_queue.put("Evt17")
        except OSError:
            self.dul.event_queue.put("Evt17")


def _silent_for(sock: socket.socket) -> str:
    timeout = sock.gettimeout()
    return f"no data for {timeout:g} s (network timeout)" if timeout else "timed out"


def _peer(assoc: Any) -> str:
    return str(getattr(getattr(assoc, "requestor", None), "address", "") or "")


def _not_dicom(header: bytes) -> str:
    """The unknown type, with what the bytes most likely are (no content is logged)."""
    kind = f"0x{header[0]:02X}"
    if header[0] == 0x16 and header[1] == 0x03:
        return f"{kind}: a TLS handshake (this port is not TLS)"
    if bytes(header[:3]).isalpha():
        return f"{kind}: text, e.g. an HTTP request"
    return kind
