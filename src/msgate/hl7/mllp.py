"""MLLP framing (HL7 v2.5.1 Appendix C): ``0x0B`` + message + ``0x1C 0x0D``.

:class:`Deframer` is a tolerant, incremental frame reader: bytes before a start block are skipped and
reported, a frame longer than the limit is dropped (its first bytes are kept so the caller can still
answer with a NAK that echoes MSH-10), and a start block inside an open frame ends the open frame as
*unterminated* (the sender lost its end block); inside a dropped oversize frame it ends that frame. An
end block split across reads is found either way. Nothing here logs payload bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SB = b"\x0b"
EB = b"\x1c"
CR = b"\x0d"
END = EB + CR
HEAD_KEEP = 4096

EventKind = Literal["frame", "garbage", "oversize", "unterminated"]


@dataclass(frozen=True)
class FrameEvent:
    """One thing the deframer saw: a complete frame, skipped garbage, an oversize or unterminated frame."""

    kind: EventKind
    payload: bytes = b""
    size: int = 0


def frame(payload: bytes) -> bytes:
    """Wrap one message in MLLP start and end blocks."""
    return SB + payload + END


class Deframer:
    """Incremental MLLP reader; ``feed`` returns the events completed by the new bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._in_frame = False
        self._skipping = False  # inside an oversize frame, waiting for its end block
        self._skipped = 0
        self._head = b""

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (used to report a connection cut mid-message)."""
        return len(self._buf) + self._skipped if (self._in_frame or self._skipping) else 0

    def feed(self, data: bytes) -> list[FrameEvent]:
        self._buf += data
        events: list[FrameEvent] = []
        while self._step(events):
            pass
        return events

    def _step(self, events: list[FrameEvent]) -> bool:
        buf = self._buf
        if self._skipping:
            end = buf.find(END)
            restart = buf.find(SB)
            if restart >= 0 and (end < 0 or restart < end):  # it lost its end block: the next frame starts
                events.append(FrameEvent("oversize", self._head, self._skipped + restart))
                del buf[:restart]
                self._skipping, self._skipped, self._head = False, 0, b""
                return True
            if end < 0:
                keep = 1 if buf.endswith(EB) else 0
                self._skipped += len(buf) - keep
                del buf[: len(buf) - keep]
                return False
            events.append(FrameEvent("oversize", self._head, self._skipped + end))
            del buf[: end + 2]
            self._skipping, self._skipped, self._head = False, 0, b""
            return True
        if not self._in_frame:
            start = buf.find(SB)
            if start < 0:
                if buf:
                    events.append(FrameEvent("garbage", size=len(buf)))
                    buf.clear()
                return False
            if start:
                events.append(FrameEvent("garbage", size=start))
            del buf[: start + 1]
            self._in_frame = True
            return True
        return self._in_open_frame(events)

    def _in_open_frame(self, events: list[FrameEvent]) -> bool:
        buf = self._buf
        end = buf.find(END)
        restart = buf.find(SB)
        if restart >= 0 and (end < 0 or restart < end):
            events.append(FrameEvent("unterminated", bytes(buf[:restart]), restart))
            del buf[:restart]
            self._in_frame = False
            return True
        keep = 1 if end < 0 and buf.endswith(EB) else 0  # maybe the first byte of the end block
        limit = end if end >= 0 else len(buf) - keep
        if limit > self.max_bytes:
            self._head = bytes(buf[:HEAD_KEEP])
            self._in_frame, self._skipping = False, True
            if end >= 0:
                events.append(FrameEvent("oversize", self._head, end))
                del buf[: end + 2]
                self._skipping, self._head = False, b""
                return True
            self._skipped = len(buf) - keep
            del buf[: len(buf) - keep]
            return False
        if end < 0:
            return False
        events.append(FrameEvent("frame", bytes(buf[:end]), end))
        del buf[: end + 2]
        self._in_frame = False
        return True
