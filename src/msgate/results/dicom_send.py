"""C-STORE SCU for result objects, immune to pynetdicom's requestor reactor race.

The race (reference/peer-baselines.md, observation 5): ``send_c_store`` pauses the association's
reactor by clearing ``_reactor_checkpoint`` and polling ``_is_paused``. After the previous send set
the checkpoint again, the reactor may still report "paused" while it is about to wake up; it then
takes the next C-STORE-RSP off the DIMSE queue as an "unexpected" message, and the sender waits out
its DIMSE timeout. :class:`_Checkpoint` replaces the association's checkpoint with an Event that
knows when the reactor is really parked inside ``wait()``, and :meth:`Sender.send` parks it before
every C-STORE, so no response can reach the reactor. A DIMSE timeout, an abort or a lost
association is still reported (Transient) and the outbox retries with the same SOP Instance UID.

Status classes (PS3.4 Annex B.2.3, PS3.7 C): success ``0x0000`` and every warning (``0x0001``,
``0x0107`` attribute list error, ``0x0116`` attribute value out of range, ``0xBxxx``: the object was
stored) are delivered, and so is ``0x0111`` (duplicate SOP instance: msgate's objects have fresh UIDs,
so the peer holds this object from an earlier attempt whose answer was lost); ``0xA7xx`` (out of resources), ``0xCxxx`` (cannot understand) and every
transport failure are retried; ``0xA9xx`` (data set does not match SOP class), ``0x0122`` (SOP class
not supported, also used when the peer refused the object's presentation context; Verification is
always requested so the association survives that) and ``0x0124`` (not authorised) are permanent.

DICOM TLS (PS3.15 B.9): a destination with ``tls.enabled`` is associated over TLS with the context its
:class:`~msgate.config_tls.ClientTlsSettings` make; the TCP connect and the handshake are bounded by the
ACSE timeout. pynetdicom reports a failed handshake only as "no connection" (and an alert sent after a
TLS 1.3 handshake, such as a required client certificate, as an abort), so the context's sockets keep
the first TLS failure (:class:`_WatchedContext`) and the association error names it: a retryable
``Transient`` with code ``tls`` and a detail such as "TLS: certificate verify failed (...)".
"""

from __future__ import annotations

import io
import logging
import ssl
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association

from msgate.config import PacsDestination
from msgate.config_tls import tls_failure
from msgate.errors import Rejected, Transient

log = logging.getLogger(__name__)
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

VERIFICATION = "1.2.840.10008.1.1"
WARNINGS = frozenset({0x0001, 0x0107, 0x0116})  # plus the 0xBxxx range
STORED = frozenset({0x0111})  # duplicate SOP instance: already there
PERMANENT = frozenset({0x0122, 0x0124})
PARK_TIMEOUT = 5.0


class _Checkpoint(threading.Event):
    """``threading.Event`` whose waiter (the reactor) cannot slip through once it is parked.

    Unlike ``Event.wait``, a waiter that was notified by ``set()`` but finds the flag cleared again
    when it gets the lock back keeps waiting (``wait_for`` on the flag). So "parked and the flag
    is clear" really means the reactor cannot take a message until the next ``set()``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.parked = False
        self.set()

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:  # type: ignore[attr-defined]  # Event's own condition
            if self._flag:  # type: ignore[attr-defined]
                return True
            self.parked = True
            self._cond.notify_all()  # type: ignore[attr-defined]
            try:
                return bool(self._cond.wait_for(lambda: self._flag, timeout))  # type: ignore[attr-defined]
            finally:
                self.parked = False

    def park(self, timeout: float) -> bool:
        """Clear the flag and block until the reactor sits in ``wait()``: it cannot take messages then."""
        with self._cond:  # type: ignore[attr-defined]
            self._flag = False  # type: ignore[attr-defined]
            return bool(self._cond.wait_for(lambda: self.parked, timeout))  # type: ignore[attr-defined]


class _WatchedSocket(ssl.SSLSocket):
    """An SSLSocket that leaves its first TLS failure on its :class:`_WatchedContext` (pynetdicom logs
    the exception and reports only a lost connection): a failed handshake, or a session the peer ended
    before its first answer (after a TLS 1.3 handshake a refused client certificate shows only so)."""

    answered = False

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:  # a reset, an EOF or a timeout during the handshake is a TLS failure too
            self._note(exc, handshake=True)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            data = super().recv(buflen, flags)
        except (ssl.SSLError, ConnectionError) as exc:
            if not self.answered:
                self._note(exc, handshake=False)
            raise
        if not data and not self.answered:
            self._note(ssl.SSLEOFError(), handshake=False)
        self.answered = self.answered or bool(data)
        return data

    def _note(self, exc: OSError, *, handshake: bool) -> None:
        context = self.context
        if isinstance(context, _WatchedContext) and context.failure is None:
            context.failure = tls_failure(exc, timeout=context.handshake_timeout, handshake=handshake)


class _WatchedContext(ssl.SSLContext):
    """A client context whose sockets record the first TLS failure, as operator text, in ``failure``."""

    failure: str | None = None
    handshake_timeout: float | None = None
    sslsocket_class = _WatchedSocket


def _tls_args(dest: PacsDestination, timeout: float) -> tuple[_WatchedContext, str] | None:
    """``tls_args`` for ``AE.associate``: a fresh context per association (renewed files are read)."""
    if not dest.tls.enabled:
        return None
    context = _WatchedContext(ssl.PROTOCOL_TLS_CLIENT)
    context.handshake_timeout = timeout
    dest.tls.configure(context)
    return context, dest.tls.server_hostname(dest.host)


class _Rejection:
    """An ``EVT_ACSE_RECV`` handler that keeps the peer's A-ASSOCIATE-RJ as operator text: pynetdicom logs
    the result, source and reason and reports only ``is_rejected``, so ``outbox list`` said "association
    rejected" and the operator could not tell a calling AE title the PACS does not know (fix the PACS's
    list) from a PACS that is busy (wait)."""

    def __init__(self) -> None:
        self.text = ""

    def __call__(self, event: evt.Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]
        if self.text or getattr(primitive, "result", None) not in (0x01, 0x02):
            return
        try:
            self.text = f"{primitive.result_str.lower()}, {primitive.source_str.lower()}: {primitive.reason_str}"
        except (KeyError, TypeError, ValueError):  # codes the standard does not define
            self.text = (f"result {primitive.result}, source {primitive.result_source}, "
                         f"reason {primitive.diagnostic}")


class NotPaused(RuntimeError):
    """The association's reactor did not park in time: the C-STORE was not sent."""


def steady(assoc: Association) -> Association:
    """Give an established requestor association the race-free checkpoint (see the module docstring);
    then send with :func:`c_store`. For every pynetdicom SCU msgate runs: results, the demo's senders."""
    if not isinstance(assoc._reactor_checkpoint, _Checkpoint):
        assoc._reactor_checkpoint = _Checkpoint()  # the reactor reads the attribute on every loop
    return assoc


def c_store(assoc: Association, ds: Dataset) -> Dataset:
    """``send_c_store`` with the reactor parked first, so the response cannot be taken as "unexpected";
    an empty Dataset (no Status) when no valid response came, as pynetdicom returns. Raises
    :class:`NotPaused` when the reactor did not park within ``PARK_TIMEOUT`` (nothing was sent)."""
    checkpoint = steady(assoc)._reactor_checkpoint
    assert isinstance(checkpoint, _Checkpoint)
    if not checkpoint.park(PARK_TIMEOUT):
        checkpoint.set()  # let the reactor run again: it must still see the peer's release or abort
        raise NotPaused("reactor did not pause")
    try:
        return assoc.send_c_store(ds)
    except Exception:
        checkpoint.set()
        raise


@dataclass(frozen=True)
class Outcome:
    sop_instance_uid: str
    status: int | None
    detail: str

    @property
    def delivered(self) -> bool:
        if self.status is None:
            return False
        return self.status == 0x0000 or self.status in WARNINGS or self.status in STORED or (
            self.status & 0xF000) == 0xB000

    @property
    def permanent(self) -> bool:
        return self.status is not None and ((self.status & 0xFF00) == 0xA900 or self.status in PERMANENT)


class Sender:
    """One association to one destination; ``send`` one Part-10 encoded object at a time."""

    def __init__(self, dest: PacsDestination, *, calling_aet: str = "MSGATE", acse_timeout: float = 30.0,
                 dimse_timeout: float = 60.0, network_timeout: float = 60.0) -> None:
        self.dest, self.calling_aet = dest, calling_aet
        self.timeouts = (acse_timeout, dimse_timeout, network_timeout)
        self.assoc: Association | None = None

    def open(self, sop_classes: Sequence[str]) -> None:
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = self.timeouts
        ae.connection_timeout = self.timeouts[0]  # TCP connect and TLS handshake (None: could wait forever)
        for uid in dict.fromkeys(sop_classes):
            ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_requested_context(VERIFICATION)  # keeps the association up when every storage context is refused
        tls = _tls_args(self.dest, self.timeouts[0])
        rejection = _Rejection()
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title, tls_args=tls,
                             evt_handlers=[(evt.EVT_ACSE_RECV, rejection)])
        if not assoc.is_established:
            if tls is not None and tls[0].failure is not None:
                raise Transient(tls[0].failure, code="tls")
            reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no connection"
            why = f" ({rejection.text})" if assoc.is_rejected and rejection.text else ""
            raise Transient(f"association {reason}{why}", code=f"assoc_{reason.replace(' ', '_')}")
        self.assoc = steady(assoc)

    def send(self, encoded: bytes) -> Outcome:
        """C-STORE one object; the Outcome's status is None when no valid response came back."""
        ds: Dataset = dcmread(io.BytesIO(encoded))
        uid = str(ds.SOPInstanceUID)
        assoc = self.assoc
        if assoc is None or not assoc.is_established:
            return Outcome(uid, None, "association lost")
        if not any(cx.abstract_syntax == ds.SOPClassUID for cx in assoc.accepted_contexts):
            return Outcome(uid, 0x0122, "0x0122 (presentation context rejected: SOP class not supported)")
        try:
            rsp = c_store(assoc, ds)
        except NotPaused:
            return Outcome(uid, None, "reactor did not pause")
        except (ValueError, RuntimeError, AttributeError) as exc:
            return Outcome(uid, None, f"send failed ({type(exc).__name__})")
        if "Status" not in rsp:
            return Outcome(uid, None, "no response (DIMSE timeout or abort)")
        status = int(rsp.Status)
        return Outcome(uid, status, f"0x{status:04X}")

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None


@contextmanager
def association(dest: PacsDestination, sop_classes: Sequence[str], **kwargs: float | str) -> Iterator[Sender]:
    sender = Sender(dest, **kwargs)  # type: ignore[arg-type]
    sender.open(sop_classes)
    try:
        yield sender
    finally:
        sender.close()


def sop_class_of(encoded: bytes) -> str:
    ds = dcmread(io.BytesIO(encoded), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    uid = ds.get("SOPClassUID")
    if not uid:
        raise Rejected("result object without SOP Class UID", code="bad_object")
    return str(uid)
