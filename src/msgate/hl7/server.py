"""The HL7 role: an asyncio MLLP server that acknowledges only what it has stored.

Commit path (this process, on the event loop, per frame): read MSH only (:mod:`msgate.hl7.msh`) and
decide AR for what cannot be accepted; then the message is made durable, encrypted, in the commit journal
(:mod:`msgate.storage.journal`, one ``fdatasync`` per group of messages that arrived together) and only then
answered: ``AA`` in original mode, ``CA`` in enhanced mode (MSH-15/16 valued, per MSH-15).

Index and mapping path (another process, :mod:`msgate.hl7.indexer`): it reads the journal records the
committer announces as durable, stores them through ``Ingest.store_hl7_batch`` (deduplicated on MSH-10 +
MSH-3/4, audited; a duplicate is acknowledged again and never mapped again), maps them, and reports the
outcome of the messages that want an application ACK (enhanced mode, per MSH-16), which this process sends
on their connection. At start, journal segments left by a crash are indexed before the port opens.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import itertools
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

from msgate.config import Hl7Settings
from msgate.errors import Rejected, Transient
from msgate.hl7 import mllp
from msgate.hl7.ack import AckError, build_ack, wrap_batch
from msgate.hl7.msh import HeaderError, Msh, check_msh, read_msh
from msgate.hl7.parse import is_batch, split_batch
from msgate.hl7.supervisor import AppAck, IndexerProcess
from msgate.storage.ingest import Hl7Header
from msgate.storage.journal import Journal
from msgate.storage.store import Store

log = logging.getLogger(__name__)

# ORM and ORU have one trigger each before v2.5 (O01, R01): a message without one (HL7 v2.1 has no MSH-9.2)
# is that one, mapped with a finding
ORDER_TRIGGERS = {"ORM": {"O01", ""}, "OMI": {"O23"}, "OMG": {"O19"}, "ORU": {"R01", ""}}
MAX_GROUP = 256
STOP_DRAIN_S = 10.0  # the indexer's time to finish at shutdown; the rest waits in the journal
_conn_ids = itertools.count(1)


def supported(msh: Msh) -> AckError | None:
    """None when msgate handles this type; else the ERR for AR (200 unknown type, 201 unknown event).

    Locations are ERL (segment^sequence^field^repetition^component): MSH-9.1 and MSH-9.2. An ADT's event
    is MSH-9.2, else EVN-1 (HL7 v2.1); an ADT with neither is refused, never stored to be skipped."""
    if msh.message_type == "ADT":
        return None if msh.trigger else AckError(201, "MSH^1^9^1^2")
    triggers = ORDER_TRIGGERS.get(msh.message_type)
    if triggers is None:
        return AckError(200, "MSH^1^9^1^1")
    if msh.trigger not in triggers:
        return AckError(201, "MSH^1^9^1^2")
    return None


@dataclass
class _Pending:
    raw: bytes
    header: Hl7Header
    callback: AppAck | None
    future: asyncio.Future[None]


class Committer:
    """Group commit: one journal fsync in flight; everything that queued meanwhile goes in the next one.

    A message's future resolves only after the fsync that holds it, and the indexer process hears of the
    records only then. Record numbers are counted here (this is the journal's only writer); a failed write
    retires the segment (``Journal.close``), so the next commit starts a fresh one and the counts stay true.
    """

    def __init__(self, store: Store, journal: Journal, indexer: IndexerProcess) -> None:
        self.store, self.journal, self.indexer = store, journal, indexer
        self.queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self.batches = 0
        self.segment: str | None = None
        self.count = 0  # records in ``segment``

    async def submit(self, raw: bytes, header: Hl7Header, callback: AppAck | None) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(raw, header, callback, fut))
        await fut

    async def run(self) -> None:
        """Commit groups until the ``None`` sentinel (every group queued before it is committed)."""
        loop = asyncio.get_running_loop()
        while (first := await self.queue.get()) is not None:
            group, stop = [first], False
            while not self.queue.empty() and len(group) < MAX_GROUP:
                item = self.queue.get_nowait()
                if item is None:
                    stop = True
                    break
                group.append(item)
            try:
                segment = await loop.run_in_executor(None, self._commit, group)
            except Exception as exc:  # resolve every waiter; the connection turns it into AE
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(exc)
            else:
                self._durable(segment, group)
            if stop:
                return

    def _durable(self, segment: str, group: list[_Pending]) -> None:
        if segment != self.segment:
            self.segment, self.count = segment, 0
        first = self.count + 1
        self.count += len(group)
        self.batches += 1
        callbacks = {first + i: p.callback for i, p in enumerate(group) if p.callback is not None}
        self.indexer.durable(segment, first, self.count, callbacks)
        for item in group:
            if not item.future.done():
                item.future.set_result(None)

    def _commit(self, group: list[_Pending]) -> str:
        self.store.ingest.check_space()
        try:
            return self.journal.append([p.raw for p in group])
        except OSError as exc:  # the journal retired the segment the failed group may sit in half-written
            self.segment = None
            raise Transient(f"journal write failed ({type(exc).__name__})", code="journal_io") from None


class Hl7Server:
    """The MLLP listener. ``await start()`` binds (port 0 allowed); ``port`` is the bound port."""

    def __init__(self, store: Store, settings: Hl7Settings | None = None) -> None:
        self.store = store
        self.settings = settings or store.settings.hl7
        self.networks = [ipaddress.ip_network(n, strict=False) for n in self.settings.allowed_networks]
        # Zero-filled segments made ahead: an append overwrites allocated blocks, so its fdatasync has no
        # size or extent change to journal (measured here: fdatasync p99 9-10 ms instead of 13-18 ms).
        self.journal = Journal(store.settings.home / "hl7-journal", store.ring, preallocate=True)
        self.indexer = IndexerProcess(store.settings)
        self.committer = Committer(store, self.journal, self.indexer)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.connections: set[Any] = set()

    def _ssl(self) -> ssl.SSLContext | None:
        tls = self.settings.tls
        if not tls.enabled:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if tls.cert_file is None or tls.key_file is None:
            raise Rejected("MSGATE_HL7__TLS__ENABLED needs cert_file and key_file", code="config")
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.ca_file is not None:
            ctx.load_verify_locations(tls.ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    async def start(self) -> int:
        recovered = await self.indexer.start()  # leftovers of a crash are indexed before the port opens
        await asyncio.get_running_loop().run_in_executor(None, self.journal.append, [])  # the first segment
        self._tasks.append(asyncio.create_task(self.committer.run()))
        from msgate.hl7.connection import Connection

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await Connection(self, reader, writer, next(_conn_ids)).serve()

        if self.settings.host in ("::", ""):  # every address, IPv4 included (asyncio binds "::" IPv6-only)
            self._server = await asyncio.start_server(accept, sock=_dual_stack(self.settings.port),
                                                      ssl=self._ssl(), limit=1 << 20, backlog=256)
        else:
            self._server = await asyncio.start_server(accept, self.settings.host, self.settings.port,
                                                      ssl=self._ssl(), limit=1 << 20, backlog=256)
        self.port = self._server.sockets[0].getsockname()[1]
        if not self.networks:
            log.warning("HL7 listener is open to any source address; set MSGATE_HL7__ALLOWED_NETWORKS",
                        extra={"role": "hl7", "port": self.port})
        log.info("hl7 listening", extra={"role": "hl7", "host": self.settings.host, "port": self.port,
                                         "count": recovered})
        return self.port

    def allowed(self, host: str) -> bool:
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # an IPv4 peer of a dual-stack ("::") listener: ::ffff:a.b.c.d
        return any(address in net for net in self.networks)

    async def stop(self) -> None:
        """Stop listening, close connections, commit what was queued, then let the indexer finish."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.writer.close()
        for _ in range(100):
            if not self.connections:
                break
            await asyncio.sleep(0.02)
        await self.committer.queue.put(None)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        segment = self.committer.segment
        self.journal.close()
        await self.indexer.stop(closed_segment=segment, drain_s=STOP_DRAIN_S)


def run(store: Store, stop: threading.Event) -> None:
    """Serve role ``hl7``: block until ``stop`` is set (``msgate serve --role hl7``)."""

    async def main() -> None:
        server = Hl7Server(store)
        await server.start()
        gc.freeze()  # what start-up allocated is never scanned again: shorter collections on the ACK path
        while not stop.is_set():
            await asyncio.sleep(0.2)
        started = time.monotonic()
        await server.stop()
        log.info("hl7 stopped", extra={"role": "hl7", "elapsed_s": round(time.monotonic() - started, 2)})

    asyncio.run(main())


__all__ = ["Hl7Server", "run", "supported", "Transient", "HeaderError", "read_msh", "check_msh", "build_ack",
           "wrap_batch", "mllp", "split_batch", "is_batch"]


def _dual_stack(port: int) -> socket.socket:
    """One socket on every IPv6 and IPv4 address (IPv4 peers arrive as ``::ffff:a.b.c.d``)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    return sock

