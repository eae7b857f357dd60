"""One MLLP connection: frames in, one answer per message out, in order; never a silent close.

Garbage before a start block is skipped, an oversize frame or one whose end block never came gets
``AR`` (echoing MSH-10 when its header was readable), the idle timeout and a connection cut
mid-message close cleanly; a half-closed socket still gets the answers to what it sent. Logs carry the
connection id, a reason code and sizes, never payload bytes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from msgate.errors import Rejected, Transient
from msgate.hl7 import mllp
from msgate.hl7.ack import AckError, build_ack, encode_ack, wrap_batch
from msgate.hl7.msh import HeaderError, Msh, check_msh, read_msh
from msgate.hl7.parse import is_batch, split_batch

if TYPE_CHECKING:
    from msgate.hl7.server import Hl7Server

log = logging.getLogger(__name__)


class Connection:
    def __init__(self, server: Hl7Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn_id: int) -> None:
        self.server, self.reader, self.writer, self.conn_id = server, reader, writer, conn_id
        self.settings = server.settings
        self.deframer = mllp.Deframer(self.settings.max_message_bytes)
        self.messages = 0

    def _ack(self, code: str, msh: Msh | None, errors: tuple[AckError, ...] = (), text: str = "") -> str:
        return build_ack(code, msh, errors=errors, sending_application=self.settings.sending_application,
                         sending_facility=self.settings.sending_facility, text=text)

    async def serve(self) -> None:
        peer = self.writer.get_extra_info("peername") or ("", 0)
        if not self.server.allowed(str(peer[0])):
            log.warning("hl7 connection refused: source not allowed", extra={"conn_id": self.conn_id,
                                                                              "reason": "network_not_allowed"})
            self.writer.close()
            return
        log.info("hl7 connection opened", extra={"conn_id": self.conn_id})
        self.server.connections.add(self)
        reason = "closed_by_peer"
        try:
            reason = await self._loop()
        except (ConnectionError, asyncio.IncompleteReadError):
            reason = "connection_reset"
        except asyncio.CancelledError:
            reason = "shutdown"
        finally:
            self.server.connections.discard(self)
            if self.deframer.pending:
                log.warning("hl7 connection cut mid-message", extra={"conn_id": self.conn_id, "reason": "cut_mid_frame",
                                                                     "bytes": self.deframer.pending})
            try:
                self.writer.close()
                await asyncio.wait_for(self.writer.wait_closed(), 5)
            except (ConnectionError, asyncio.TimeoutError, OSError):
                pass
            log.info("hl7 connection closed", extra={"conn_id": self.conn_id, "reason": reason, "count": self.messages})

    async def _loop(self) -> str:
        while True:
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 16), self.settings.idle_timeout)
            except asyncio.TimeoutError:
                return "idle_timeout"
            if not data:
                return "closed_by_peer"
            for event in self.deframer.feed(data):
                answer = await self._event(event)
                if answer:
                    self.writer.write(mllp.frame(answer))
                    await self.writer.drain()

    async def _event(self, event: mllp.FrameEvent) -> bytes | None:
        if event.kind == "garbage":
            log.warning("hl7 bytes outside a frame skipped", extra={"conn_id": self.conn_id,
                                                                    "reason": "garbage_before_start_block",
                                                                    "bytes": event.size})
            return None
        if event.kind in ("oversize", "unterminated"):
            code = 104 if event.kind == "oversize" else 100
            log.warning("hl7 frame rejected", extra={"conn_id": self.conn_id, "reason": event.kind,
                                                     "bytes": event.size})
            msh = _try_msh(event.payload)
            return self._encode(self._ack("AR", msh, (AckError(code, "MSH^1"),),
                                          text="message too large" if code == 104 else "missing MLLP end block"), msh)
        self.messages += 1
        if is_batch(event.payload):
            return await self._batch(event.payload) or None
        msh, text = await self._message(event.payload)
        return self._encode(text, msh) if text else None

    def _encode(self, text: str, msh: Msh | None) -> bytes:
        return encode_ack(text, msh)

    async def _message(self, raw: bytes) -> tuple[Msh | None, str | None]:
        """Store one message and return its answer (None: MSH-15/16 ask for none)."""
        try:
            msh = read_msh(raw)
            check_msh(msh)
        except HeaderError as exc:
            log.warning("hl7 message rejected", extra={"conn_id": self.conn_id, "reason": exc.reason,
                                                       "code": exc.code})
            return exc.header, self._refuse("R", exc.header, (AckError(exc.code, exc.location),), exc.reason)
        from msgate.hl7.server import supported

        processing = msh.get(11, 1).strip().upper() or "P"
        if processing not in self.settings.processing_ids:  # a test feed routed to production, or the reverse
            log.warning("hl7 processing id refused", extra={"conn_id": self.conn_id, "code": 202,
                                                            "reason": processing[:1]})
            return msh, self._refuse("R", msh, (AckError(202, "MSH^1^11"),),
                                     "processing id not accepted here")
        problem = supported(msh)
        if problem is not None:
            log.warning("hl7 message type not handled", extra={"conn_id": self.conn_id, "code": problem.code,
                                                               "msg_type": f"{msh.message_type}^{msh.trigger}"})
            return msh, self._refuse("R", msh, (problem,), "message type not handled")
        try:
            await self.server.committer.submit(raw, msh.header(), self._app_ack_callback(msh))
        except Transient as exc:
            log.warning("hl7 store failed", extra={"conn_id": self.conn_id, "reason": exc.code})
            return msh, self._refuse("E", msh, (AckError(207, "MSH^1"),), "temporarily unable to store")
        except Rejected as exc:
            log.warning("hl7 store refused", extra={"conn_id": self.conn_id, "reason": exc.code})
            return msh, self._refuse("R", msh, (AckError(207, "MSH^1"),), "refused")
        except Exception:
            log.exception("hl7 store failed", extra={"conn_id": self.conn_id})
            return msh, self._refuse("E", msh, (AckError(207, "MSH^1"),), "internal error")
        code = msh.stored_ack
        return msh, (self._ack(code, msh) if code else None)

    def _refuse(self, kind: str, msh: Msh | None, errors: tuple[AckError, ...], text: str) -> str | None:
        """The answer to a message that was not stored (``kind`` R: refused, E: error; HL7 v2.5.1 §2.9.3).

        Original mode (or no readable MSH): AR/AE. Enhanced mode: the commit ACK CR/CE only as MSH-15 asks
        (AL, ER or empty; never NE, nor SU, which asks for successes only); else, the message never reaching
        the application, its application ACK AR/AE when MSH-16 asks for errors (AL, ER); else nothing."""
        if msh is None or not msh.enhanced:
            return self._ack(f"A{kind}", msh, errors, text=text)
        if msh.accept_ack not in ("NE", "SU"):
            return self._ack(f"C{kind}", msh, errors, text=text)
        if msh.app_ack in ("AL", "ER"):
            return self._ack(f"A{kind}", msh, errors, text=text)
        return None

    def _app_ack_callback(self, msh: Msh):  # type: ignore[no-untyped-def]
        """Enhanced mode: send the application ACK per MSH-16 (AL always, ER on error, SU on success)."""
        if not msh.enhanced or msh.app_ack not in ("AL", "ER", "SU"):
            return None
        loop = asyncio.get_running_loop()

        def send(code: str, reason: str) -> None:
            if (msh.app_ack == "ER" and code == "AA") or (msh.app_ack == "SU" and code != "AA"):
                return
            errors = (mapping_error(reason),) if code != "AA" else ()
            payload = mllp.frame(self._encode(self._ack(code, msh, errors, text=reason), msh))
            loop.call_soon_threadsafe(self._write_if_open, payload)

        return send

    def _write_if_open(self, payload: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(payload)

    async def _batch(self, raw: bytes) -> bytes | None:
        """An FHS/BHS batch in one frame: each message is handled, then one batch acknowledgement."""
        messages, has_fhs = split_batch(raw)
        if not messages:  # an empty batch (BHS, BTS|0): answered with an empty batch, never with silence
            return self._encode(wrap_batch([], enc=read_msh_default(), file_header=has_fhs), None)
        answers = await asyncio.gather(*(self._message(m) for m in messages))
        texts = [t for _, t in answers if t]
        if not texts:  # every message said MSH-15 NE (or ER and all went well): nothing to send
            return b""
        first = next((m for m, _ in answers if m is not None), None)
        text = wrap_batch(texts, enc=first.enc if first else read_msh_default(), file_header=has_fhs,
                          received=_batch_headers(raw))
        return self._encode(text, first)


def _batch_headers(raw: bytes) -> dict[str, list[str]]:
    """The sender's FHS and BHS lines, split on their field separator (the character after the tag)."""
    out: dict[str, list[str]] = {}
    for line in raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r"):
        line = line.lstrip()
        tag = line[:3].decode("ascii", "replace")
        if tag in ("FHS", "BHS") and tag not in out and len(line) > 3:
            out[tag] = line.decode("latin-1").split(line[3:4].decode("latin-1"))
    return out


def read_msh_default():  # type: ignore[no-untyped-def]
    from msgate.hl7.msh import DEFAULT_ENCODING

    return DEFAULT_ENCODING


def _try_msh(head: bytes) -> Msh | None:
    try:
        return read_msh(head)
    except HeaderError:
        return None
    except Exception:
        return None


MAPPING_ERRORS = {  # mapping_error -> HL7 table 0357 code and the location it names
    "no_patient_segment": (100, "PID"),
    "no_patient_identifier": (101, "PID^1^3"),
    "merge_without_mrg": (100, "MRG"),
    "no_order_segment": (100, "ORC"),
    "missing_trigger_event": (201, "MSH^1^9^1^2"),
    "identifier_conflict": (205, "PID^1^3"),  # 205 duplicate key: PID-3 names two patients, or a second MR
}


def mapping_error(reason: str) -> AckError:
    """The ERR segment of an application ACK for a message that could not be mapped: what is missing and
    where (100 segment missing, 101 required field missing), else 207 (application internal error)."""
    code, location = MAPPING_ERRORS.get(reason, (207, ""))
    return AckError(code, location)

