"""The HL7 role: an asyncio MLLP server that acknowledges only what it has stored.

Commit path (on the event loop, per frame): read MSH only (:mod:`msgate.hl7.msh`) and decide AR for what
cannot be accepted; then the message is made durable, encrypted, in the commit journal
(:mod:`msgate.storage.journal`, one ``fdatasync`` per group of messages that arrived together) and only then
answered: ``AA`` in original mode, ``CA`` in enhanced mode (MSH-15/16 valued, per MSH-15). The
:class:`Indexer` thread moves journaled messages into the index through ``Ingest.store_hl7_batch``
(deduplicated on MSH-10 + MSH-3/4, audited); a duplicate is acknowledged again and never mapped again.

Mapping path: a worker thread maps indexed messages in batches (:func:`msgate.hl7.mapping.map_messages`);
in enhanced mode it triggers the application ACK per MSH-16 on the same connection. At start, journal
segments left by a crash are indexed and messages still ``pending`` are mapped, before the port opens.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import queue
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlmodel import col, select

from msgate.config import Hl7Settings
from msgate.batching import take_batch
from msgate.errors import Rejected, Transient
from msgate.hl7 import mllp
from msgate.hl7.ack import AckError, build_ack, wrap_batch
from msgate.storage.journal import Journal, read_segment
from msgate.hl7.mapping import map_messages
from msgate.hl7.msh import HeaderError, Msh, check_msh, read_msh
from msgate.hl7.parse import is_batch, split_batch
from msgate.storage.ingest import Hl7Header
from msgate.storage.models import Hl7Message
from msgate.storage.store import Store

log = logging.getLogger(__name__)

ORDER_TRIGGERS = {"ORM": {"O01"}, "OMI": {"O23"}, "OMG": {"O19"}, "ORU": {"R01", ""}}
MAX_GROUP = 256
AppAck = Callable[[str, str], None]
_MapItem = tuple[int, str, AppAck | None, bytes | None]  # message id, accept ACK code, app-ACK callback, raw
_conn_ids = itertools.count(1)


def supported(msh: Msh) -> AckError | None:
    """None when msgate handles this type; else the ERR for AR (200 unknown type, 201 unknown event)."""
    if msh.message_type == "ADT":
        return None
    triggers = ORDER_TRIGGERS.get(msh.message_type)
    if triggers is None:
        return AckError(200, "MSH^1^9^1")
    if msh.trigger not in triggers:
        return AckError(201, "MSH^1^9^2")
    return None


@dataclass
class _Pending:
    raw: bytes
    header: Hl7Header
    ack: str
    callback: AppAck | None
    future: asyncio.Future[None]


class Committer:
    """Group commit: one journal fsync in flight; everything that queued meanwhile goes in the next one.

    A message's future resolves only after the fsync that holds it; the indexer then stores it through
    ``Ingest.store_hl7_batch`` (dedup, audit) and hands it to the mapping worker.
    """

    def __init__(self, store: Store, journal: Journal, indexer: Indexer) -> None:
        self.store, self.journal, self.indexer = store, journal, indexer
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.batches = 0

    async def submit(self, raw: bytes, header: Hl7Header, ack: str, callback: AppAck | None) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(raw, header, ack, callback, fut))
        await fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = [await self.queue.get()]
            while not self.queue.empty() and len(group) < MAX_GROUP:
                group.append(self.queue.get_nowait())
            try:
                segment = await loop.run_in_executor(None, self._commit, group)
            except Exception as exc:  # resolve every waiter; the connection turns it into AE
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self.batches += 1
            FEED.last_commit = time.monotonic()
            self.indexer.items.put((segment, [(p.raw, p.header, p.ack, p.callback) for p in group]))
            for item in group:
                if not item.future.done():
                    item.future.set_result(None)

    def _commit(self, group: list[_Pending]) -> str:
        self.store.ingest.check_space()
        try:
            return self.journal.append([p.raw for p in group])
        except OSError as exc:
            raise Transient(f"journal write failed ({type(exc).__name__})", code="journal_io") from None




class _Feed:
    """Background work (indexing, mapping) runs at most half the time while messages are arriving, so the
    event loop that acknowledges them is not kept waiting for the GIL; when the feed is quiet it runs flat out.
    The journal holds what waits, so a backlog costs nothing but mapping delay."""

    ACTIVE_S = 0.05

    def __init__(self) -> None:
        self.last_commit = 0.0

    def yield_after(self, busy_s: float) -> None:
        if time.monotonic() - self.last_commit < self.ACTIVE_S:
            time.sleep(min(busy_s, 0.05))


FEED = _Feed()


class Indexer(threading.Thread):
    """Moves journaled messages into the store (``store_hl7_batch``), then queues them for mapping."""

    def __init__(self, store: Store, journal: Journal, mapper: MappingWorker) -> None:
        super().__init__(name="hl7-indexer", daemon=True)
        self.store, self.journal, self.mapper = store, journal, mapper
        self.items: queue.Queue[tuple[str, list[tuple[bytes, Hl7Header, str, AppAck | None]]] | None] = queue.Queue()

    def recover(self) -> int:
        """Index the segments a crash left behind (records already stored are skipped, not counted twice)."""
        total = 0
        for path in self.journal.leftovers():
            raws = read_segment(path, self.store.ring)
            items = [(raw, read_msh(raw).header()) for raw in raws]
            keys = [self.store.ingest.dedup_key(h) for _, h in items]
            with self.store.db.session() as session:
                known = set(session.exec(select(Hl7Message.dedup_index).where(
                    col(Hl7Message.dedup_index).in_(set(keys)))).all()) if keys else set()
            fresh, seen = [], set()
            for item, key in zip(items, keys, strict=True):
                if key not in known and key not in seen:
                    fresh.append(item)
                    seen.add(key)
            for k in range(0, len(fresh), MAX_GROUP):
                for stored in self.store.ingest.store_hl7_batch(fresh[k:k + MAX_GROUP]):
                    self.mapper.items.put((stored.message_id, "", None, None))
            total += len(fresh)
            path.unlink()
        return total

    def run(self) -> None:
        while (batch := take_batch(self.items, 32)) is not None:
            started = time.monotonic()
            self._index(batch)
            FEED.yield_after(time.monotonic() - started)

    def _index(self, batch: list[tuple[str, list[tuple[bytes, Hl7Header, str, AppAck | None]]]]) -> None:
        flat = [entry for _, entries in batch for entry in entries]
        for attempt in range(10):
            try:
                results = self.store.ingest.store_hl7_batch([(raw, header) for raw, header, _, _ in flat])
                break
            except Exception:  # still in the journal: retried here, and on restart at the latest
                log.exception("hl7 indexing failed; retrying", extra={"count": len(flat), "attempt": attempt})
                time.sleep(min(5.0, 0.2 * 2 ** attempt))
        else:
            return
        for (raw, _, ack, callback), stored in zip(flat, results, strict=True):
            if not stored.duplicate:
                self.mapper.items.put((stored.message_id, ack, callback, raw))
        for segment, entries in batch:
            self.journal.indexed(segment, len(entries))


class MappingWorker(threading.Thread):
    """Maps committed messages off the ACK path, in batches; calls back for enhanced-mode app ACKs."""

    def __init__(self, store: Store) -> None:
        super().__init__(name="hl7-mapping", daemon=True)
        self.store = store
        self.items: queue.Queue[_MapItem | None] = queue.Queue()
        self.mapped = 0

    def recover(self) -> int:
        with self.store.db.session() as session:
            ids = session.exec(select(Hl7Message.id).where(Hl7Message.mapping_state == "pending")
                               .order_by(col(Hl7Message.id))).all()
        for message_id in ids:
            if message_id is not None:
                self.items.put((message_id, "", None, None))
        return len(ids)

    def run(self) -> None:
        while (batch := take_batch(self.items, 64)) is not None:
            started = time.monotonic()
            self._map(batch)
            FEED.yield_after(time.monotonic() - started)

    def _map(self, batch: list[_MapItem]) -> None:
        acks = {mid: code for mid, code, _, _ in batch if code}
        raws = {mid: raw for mid, _, _, raw in batch if raw is not None}
        try:
            outcomes = map_messages(self.store, [mid for mid, _, _, _ in batch], acks=acks, raws=raws)
        except Exception:
            log.exception("mapping batch failed", extra={"count": len(batch)})
            return
        self.mapped += len(outcomes)
        for mid, _, callback, _ in batch:
            outcome = outcomes.get(mid)
            if outcome is not None and outcome.state == "error":
                log.warning("mapping error", extra={"message_id": mid, "reason": outcome.error})
            if callback is not None and outcome is not None:
                callback("AE" if outcome.state == "error" else "AA", outcome.error or "")


class Hl7Server:
    """The MLLP listener. ``await start()`` binds (port 0 allowed); ``port`` is the bound port."""

    def __init__(self, store: Store, settings: Hl7Settings | None = None) -> None:
        self.store = store
        self.settings = settings or store.settings.hl7
        self.networks = [ipaddress.ip_network(n, strict=False) for n in self.settings.allowed_networks]
        self.journal = Journal(store.settings.home / "hl7-journal", store.ring)
        self.mapper = MappingWorker(store)
        self.indexer = Indexer(store, self.journal, self.mapper)
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
        loop = asyncio.get_running_loop()
        recovered = await loop.run_in_executor(None, self.indexer.recover)
        recovered += self.mapper.recover()
        self.mapper.start()
        self.indexer.start()
        self._tasks.append(asyncio.create_task(self.committer.run()))
        from msgate.hl7.connection import Connection

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await Connection(self, reader, writer, next(_conn_ids)).serve()

        self._server = await asyncio.start_server(accept, self.settings.host, self.settings.port, ssl=self._ssl(),
                                                  limit=1 << 20, backlog=256)
        self.port = self._server.sockets[0].getsockname()[1]
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
        return any(address in net for net in self.networks)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.writer.close()
        for _ in range(100):
            if not self.connections:
                break
            await asyncio.sleep(0.02)
        while not self.committer.queue.empty():
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        loop = asyncio.get_running_loop()
        self.indexer.items.put(None)
        await loop.run_in_executor(None, self.indexer.join, 30)
        self.journal.close()
        self.mapper.items.put(None)
        await loop.run_in_executor(None, self.mapper.join, 30)


def run(store: Store, stop: threading.Event) -> None:
    """Serve role ``hl7``: block until ``stop`` is set (``msgate serve --role hl7``)."""

    # The indexer and mapping threads share the GIL with the event loop; a 1 ms switch interval (default
    # 5 ms) bounds how long an arriving frame waits for it, which is what the ACK latency target needs.
    sys.setswitchinterval(0.001)

    async def main() -> None:
        server = Hl7Server(store)
        await server.start()
        while not stop.is_set():
            await asyncio.sleep(0.2)
        started = time.monotonic()
        await server.stop()
        log.info("hl7 stopped", extra={"role": "hl7", "elapsed_s": round(time.monotonic() - started, 2)})

    asyncio.run(main())


__all__ = ["Hl7Server", "run", "supported", "Transient", "HeaderError", "read_msh", "check_msh", "build_ack",
           "wrap_batch", "mllp", "split_batch", "is_batch"]
