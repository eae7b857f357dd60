"""The server's side of the HL7 indexer process (:mod:`msgate.hl7.indexer`): start, announce, relay, stop.

The server tells the indexer which journal records are durable (after each group ``fdatasync``) and which
of them wait for an application ACK; the indexer answers with the mapping outcome of those. If the
indexer dies, it is started again (with a back-off) and picks up from the journal; application ACKs
still waiting are announced again. Stopping gives it a few seconds to finish, then kills it: what it had
not indexed stays in the journal for the next start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

from msgate import childproc
from msgate.config import Settings
from msgate.errors import Transient

log = logging.getLogger(__name__)

AppAck = Callable[[str, str], None]
START_TIMEOUT_S = 600.0  # indexing leftovers of a crash before the port opens
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class IndexerProcess:
    """Owns one ``python -m msgate.hl7.indexer`` child and the socket to it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.position: tuple[str, int] | None = None  # segment being appended, records durable there
        self.segments: dict[str, None] = {}  # every segment appended to since the start, in order
        self.waiting: dict[tuple[str, int], AppAck] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.stopping = False
        self.restarts = 0
        self._reader_task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Start the indexer; return once it has indexed what the journal held (the count)."""
        reader = await self._spawn()
        try:
            line = await asyncio.wait_for(reader.readline(), START_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if not line:
            self._kill()
            raise Transient("hl7 indexer did not start (see its log)", code="indexer_start")
        recovered = int(json.loads(line).get("ready", 0))
        self._reader_task = asyncio.create_task(self._follow(reader))
        return recovered

    async def _spawn(self) -> asyncio.StreamReader:
        ours, theirs = socket.socketpair()
        loop = asyncio.get_running_loop()
        self.proc = await loop.run_in_executor(None, self._popen, theirs)
        theirs.close()
        reader, self.writer = await asyncio.open_unix_connection(sock=ours)
        acks: dict[str, list[int]] = {}
        for segment, seq in self.waiting:
            acks.setdefault(segment, []).append(seq)
        current = self.position[0] if self.position else None
        self._send({"hello": list(self.position) if self.position else None, "fresh": self.restarts == 0,
                    "closed": [name for name in self.segments if name != current], "acks": acks})
        return reader

    def _popen(self, theirs: socket.socket) -> subprocess.Popen[bytes]:
        return childproc.spawn("msgate.hl7.indexer", theirs, self.settings)

    def durable(self, segment: str, first: int, last: int, callbacks: dict[int, AppAck]) -> None:
        """Records ``first..last`` of ``segment`` are fsynced; ``callbacks`` (by record) want an app ACK."""
        self.position = (segment, last)
        self.segments[segment] = None
        for seq, callback in callbacks.items():
            self.waiting[(segment, seq)] = callback
        self._send({"durable": [segment, last], "acks": sorted(callbacks)})

    def _send(self, msg: dict[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    async def _follow(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, ValueError):  # reset: it died with our lines unread (or one was garbled)
                line = b""
            if not line:
                if self.stopping:
                    return
                reader = await self._restart()
                continue
            try:
                outcome = json.loads(line).get("outcome")
            except (ValueError, AttributeError):
                log.warning("unreadable line from the hl7 indexer; ignored", extra={"role": "hl7"})
                continue
            if outcome is None:
                continue
            segment, seq, code, reason = outcome
            callback = self.waiting.pop((segment, seq), None)
            if callback is not None and code:
                callback(code, reason)

    async def _restart(self) -> asyncio.StreamReader:
        """The indexer died: start another one after a back-off (the journal holds what it had not done),
        and again until one reports ready. One that dies (or cannot be started) before it is ready must
        not end the follower: the feed would go on answering AA with nothing indexed behind it."""
        while True:
            code = self.proc.poll() if self.proc is not None else None
            delay = RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]
            log.error("hl7 indexer exited; starting it again",
                      extra={"role": "hl7", "code": code, "attempt": self.restarts, "count": len(self.waiting)})
            self.restarts += 1
            if self.writer is not None:
                self.writer.close()
            await asyncio.sleep(delay)
            if self.stopping:
                ended = asyncio.StreamReader()
                ended.feed_eof()
                return ended
            started = time.monotonic()
            try:
                reader = await self._spawn()
                if await reader.readline():  # ready
                    log.info("hl7 indexer running again",
                             extra={"role": "hl7", "elapsed_s": round(time.monotonic() - started, 2)})
                    return reader
            except (OSError, ValueError) as exc:  # reset before ready, or no process / descriptors left
                log.error("hl7 indexer did not start", extra={"role": "hl7", "error_type": type(exc).__name__})
            self._kill()

    async def stop(self, *, closed_segment: str | None, drain_s: float) -> None:
        """Let the indexer finish for up to ``drain_s``, then end it; never hangs."""
        self.stopping = True
        if closed_segment is not None:
            self._send({"close": closed_segment})
        self._send({"stop": drain_s})
        proc = self.proc
        if proc is not None:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, proc.wait, drain_s + 10)
            except subprocess.TimeoutExpired:
                log.warning("hl7 indexer did not stop in time; killed", extra={"role": "hl7"})
                self._kill()
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self.writer is not None:
            self.writer.close()
        if self.waiting:
            log.warning("application ACKs not sent at shutdown", extra={"role": "hl7", "count": len(self.waiting)})

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
