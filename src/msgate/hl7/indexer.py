"""The HL7 indexer process: journal segments -> index (``store_hl7_batch``) -> mapping, off the ACK path.

Why a separate process: in the server process, indexing (blob writes, SQL) and mapping shared the GIL
and the garbage collector with the event loop that answers, and every hand-off between the loop and
the fsync thread waited for the GIL behind them. Here they share nothing with the ACK path but the CPU
(this process runs at a lower priority, ``INDEXER_NICE``) and the journal files, which are durable
before the ACK anyway. The server (:mod:`msgate.hl7.supervisor`) starts it as
``python -m msgate.hl7.indexer FD`` with the settings as JSON on stdin; FD is its end of a socketpair
carrying JSON lines with segment names, record numbers, ACK codes and error codes, never message content:

server -> indexer
  ``{"hello": [segment, seq] | null, "fresh": bool, "closed": [segment, ...], "acks": {segment: [seq, ...]}}``
  first: the segment being appended, and either "every segment on disk is from before" (fresh) or the
  segments the server has closed since its start
  ``{"durable": [segment, seq], "acks": [seq, ...]}`` records up to ``seq`` are fsynced; ``acks`` want an
  application ACK (enhanced mode). A record of a new segment means every earlier segment is closed.
  ``{"close": segment}`` no more records there; ``{"stop": seconds}`` finish within that time, then exit
indexer -> server
  ``{"ready": count}`` segments left over from before are indexed (the port may open)
  ``{"outcome": [segment, seq, code | null, reason]}`` the application ACK for a record that wants one

Segments found on disk at start are indexed first, skipping records already stored (a crash after the
index commit), then deleted. A closed segment is deleted once every record in it is indexed; what is not
indexed when the process ends stays on disk for the next start. Nothing here answers the sender.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from msgate.batching import take_batch
from msgate.errors import Transient
from msgate.hl7.mapping import Outcome, map_messages
from msgate.hl7.msh import HeaderError, Msh, read_msh
from msgate.hl7.segments import SegmentReader
from msgate.storage.models import Hl7Message
from msgate.storage.store import Store

log = logging.getLogger(__name__)

INDEXER_NICE = 5  # below the server and the client it answers; still far above `nice -n 19` batch jobs
BATCH = 128
MAP_BATCH = 64
_NAME = re.compile(r"^[0-9a-f]{32}\.jnl$")


@dataclass
class Tail:
    """One segment as the indexer follows it."""

    reader: SegmentReader
    durable: int = 0  # records announced durable (an open segment is read only that far)
    closed: bool = False  # no more records will come: read to the end of the file
    recovering: bool = False  # found on disk at start: skip records already stored
    want: set[int] = field(default_factory=set)  # records waiting for an application ACK
    drained: bool = False  # closed and read to its end

    def upto(self) -> int | None:
        return None if self.closed else self.durable

    def has_work(self) -> bool:
        return not self.drained and (self.closed or self.durable > self.reader.seq)


@dataclass
class _Item:
    seq: int
    raw: bytes
    msh: Msh


class Indexer:
    """Follows the journal: reads durable records, stores them, maps them, reports application ACKs."""

    def __init__(self, store: Store, directory: Path, send: Any, mapper: Mapper) -> None:
        self.store, self.directory, self.send, self.mapper = store, directory, send, mapper
        self.cond = threading.Condition()
        self.tails: dict[str, Tail] = {}
        self.deadline: float | None = None
        self.latest: str | None = None  # the segment of the latest announcement: the only open one
        self.parent = os.getppid()

    # -- messages from the server (channel thread) --

    def on_message(self, msg: dict[str, Any]) -> None:
        with self.cond:
            if "durable" in msg:
                name, seq = msg["durable"]
                self.latest = name
                tail = self._tail(name)
                tail.durable = max(tail.durable, int(seq))
                tail.want.update(int(s) for s in msg.get("acks", ()))
                for other, earlier in self.tails.items():
                    if other != name:
                        earlier.closed = True
            elif "close" in msg and msg["close"] in self.tails:
                self.tails[msg["close"]].closed = True
            elif "stop" in msg:
                self.deadline = self.mapper.deadline = time.monotonic() + float(msg["stop"])
            self.cond.notify()

    def _tail(self, name: str, **kwargs: Any) -> Tail:
        if not _NAME.match(name):
            raise ValueError("not a journal segment name")
        if name not in self.tails:
            self.tails[name] = Tail(SegmentReader(self.directory / name, self.store.ring), **kwargs)
        return self.tails[name]

    # -- start --

    def recover(self, hello: dict[str, Any]) -> int:
        """Index what the journal holds from before: at a server's start every segment on disk; when only
        the indexer was started again, the segments the server names (any other file there is its own,
        such as a zero-filled spare). The segment being appended to is followed, not closed."""
        current, seq = hello.get("hello") or (None, 0)
        if hello.get("fresh"):
            paths = sorted(self.directory.glob("*.jnl"), key=lambda p: p.stat().st_mtime)
            names = [p.name for p in paths if _NAME.match(p.name)]
        else:
            names = [n for n in hello.get("closed", []) if (self.directory / n).exists()]
        with self.cond:  # announcements may have come in already: they only add to this
            for name in [*names, *([current] if current is not None else [])]:
                tail = self._tail(name)
                tail.recovering = True
                tail.closed = tail.closed or name != (self.latest or current)
            if current is not None:
                tail = self.tails[current]
                tail.durable = max(tail.durable, int(seq))
            for name, seqs in (hello.get("acks") or {}).items():
                if name in self.tails:
                    self.tails[name].want.update(int(s) for s in seqs)
        total = 0
        for name in [n for n, t in self.tails.items() if t.closed]:
            while (records := self._read(name)) is not None:
                total += self._process(name, records)
        return total

    # -- main loop --

    def run(self) -> None:
        """Follow the journal until told to stop (and drained, or out of time)."""
        while (name := self._wait()) is not None:
            records = self._read(name)
            if records:
                self._process(name, records)

    def _wait(self) -> str | None:
        with self.cond:
            while True:
                busy = next((n for n, t in self.tails.items() if t.has_work()), None)
                if self.deadline is not None and (busy is None or time.monotonic() > self.deadline):
                    return None
                if busy is not None:
                    return busy
                self.cond.wait(1.0)
                if os.getppid() != self.parent:  # the server is gone without a word
                    return None

    def _read(self, name: str) -> list[tuple[int, bytes]] | None:
        """The next records of ``name``; None (and the file deleted) once a closed segment is done."""
        with self.cond:
            tail = self.tails[name]
            upto = tail.upto()
        try:
            records = tail.reader.read(upto, BATCH)
        except FileNotFoundError:
            records = []
        if records:
            return records
        if upto is None:
            self._drained(name, tail)
            return None
        if tail.reader.seq < upto:  # announced durable but not readable: never expected; do not spin on it
            log.error("journal records announced but not readable", extra={"count": upto - tail.reader.seq})
            with self.cond:
                tail.durable = tail.reader.seq
        return records

    def _drained(self, name: str, tail: Tail) -> None:
        with self.cond:
            tail.drained = True
            del self.tails[name]
        (self.directory / name).unlink(missing_ok=True)

    def _process(self, name: str, records: list[tuple[int, bytes]]) -> int:
        """Store a batch of records; queue the new ones for mapping; return how many were stored."""
        with self.cond:
            tail = self.tails.get(name)
            recovering = tail.recovering if tail is not None else True
            wanted = {seq for seq, _ in records if tail is not None and seq in tail.want}
            if tail is not None:
                tail.want -= wanted
        items = []
        for seq, raw in records:
            try:
                items.append(_Item(seq, raw, read_msh(raw)))
            except HeaderError:  # the server read this MSH before journaling it; never expected
                log.error("journal record without a readable MSH skipped", extra={"seq": seq})
        all_items = items
        if recovering:
            items = self._unknown(items)
        stored, retried = self._store(items) if items else ([], False)
        ours = self._committed_before(stored) if retried and not recovering else set()
        queued = set()
        for item, result in zip(items, stored, strict=True):
            if result.duplicate and result.message_id not in ours:
                continue
            reply = (name, item.seq) if item.seq in wanted else None
            ack = "" if recovering else (item.msh.stored_ack or "")  # what the connection sends
            self.mapper.put(_Job(result.message_id, ack, item.raw, reply))
            queued.add(item.seq)
        resent = [item for item in all_items if item.seq in wanted - queued]
        self._answer_resent(name, resent)
        for seq in sorted(wanted - queued - {item.seq for item in resent}):  # no readable MSH: no answer
            self.send({"outcome": [name, seq, None, ""]})
        return len(stored)

    def _answer_resent(self, name: str, items: list[_Item]) -> None:
        """Application ACKs for records stored before (a sender that resends because it never saw one):
        the stored row's mapping outcome, once the mapping queued before them has run."""
        if not items:
            return
        keys = {item.seq: self.store.ingest.dedup_key(item.msh.header(), item.raw) for item in items}
        with self.store.db.session() as session:
            ids = dict(session.exec(select(Hl7Message.dedup_index, Hl7Message.id).where(
                col(Hl7Message.dedup_index).in_(set(keys.values())))).all())
        for item in items:
            message_id = ids.get(keys[item.seq])
            if message_id is None:
                self.send({"outcome": [name, item.seq, None, ""]})
            else:
                self.mapper.put(_Job(message_id, "", None, (name, item.seq), remap=False))

    def _unknown(self, items: list[_Item]) -> list[_Item]:
        """Drop records already stored, and repeats within the batch (indexed before a crash or restart)."""
        keys = [self.store.ingest.dedup_key(item.msh.header(), item.raw) for item in items]
        with self.store.db.session() as session:
            known = set(session.exec(select(Hl7Message.dedup_index).where(
                col(Hl7Message.dedup_index).in_(set(keys)))).all())
        fresh = []
        for item, key in zip(items, keys, strict=True):
            if key not in known:
                fresh.append(item)
                known.add(key)
        return fresh

    def _committed_before(self, stored: list[Any]) -> set[int]:
        """After a failed try, the duplicates that an earlier try of this batch committed (its COMMIT's
        answer was lost): rows still pending that the mapper has not been given. They were never
        queued for mapping, and would have stayed unmapped until the next start."""
        ids = [r.message_id for r in stored if r.duplicate]
        if not ids:
            return set()
        with self.store.db.session() as session:
            pending = set(session.exec(select(Hl7Message.id).where(
                col(Hl7Message.id).in_(ids), Hl7Message.mapping_state == "pending")).all())
        return {i for i in pending if i is not None and not self.mapper.has(i)}

    def _store(self, items: list[_Item]) -> tuple[list[Any], bool]:
        """``store_hl7_batch``, retried while the database or disk is away (the journal keeps the records);
        also whether a try failed first (a failed COMMIT may have committed after all)."""
        attempt = 0
        while True:
            try:
                return self.store.ingest.store_hl7_batch([(item.raw, item.msh.header()) for item in items]), attempt > 0
            except Exception:
                log.exception("hl7 indexing failed; retrying", extra={"count": len(items), "attempt": attempt})
                if self.deadline is not None:
                    raise SystemExit(1) from None  # stopping: the journal keeps them for the next start
                time.sleep(min(5.0, 0.2 * 2 ** attempt))
                attempt += 1


@dataclass
class _Job:
    """A stored message waiting for mapping."""

    message_id: int
    ack: str  # the ACK code to record on the row ("": not known, e.g. indexed after a restart)
    raw: bytes | None  # None: read back from its blob
    reply: tuple[str, int] | None  # (segment, record) when an application ACK waits for the outcome
    remap: bool = True  # False: mapped already (or queued before): only answer with the row's outcome


class Mapper(threading.Thread):
    """Maps stored messages in batches, behind the indexing (which decides what is stored: it goes first).

    Raw bytes ride along while the backlog is short (``KEEP_RAW``) and are read back from the blob store
    after that, so memory stays bounded however far mapping falls behind.
    """

    KEEP_RAW = 4096

    RETRY_MAX = 30.0  # s between tries of a batch that could not be mapped because the database was away

    def __init__(self, store: Store, send: Any) -> None:
        super().__init__(name="hl7-mapping", daemon=True)
        self.store, self.send = store, send
        self.items: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.deadline: float | None = None
        self._lock = threading.Lock()
        self._queued: set[int] = set()  # message ids given to map and not mapped yet

    def put(self, job: _Job) -> None:
        if self.items.qsize() > self.KEEP_RAW:
            job.raw = None
        if job.remap:
            with self._lock:
                self._queued.add(job.message_id)
        self.items.put(job)

    def has(self, message_id: int) -> bool:
        with self._lock:
            return message_id in self._queued

    def queue_pending(self) -> int:
        """Queue what was stored but not mapped before the last stop or crash."""
        with self.store.db.session() as session:
            ids = [i for i in session.exec(select(Hl7Message.id).where(Hl7Message.mapping_state == "pending")
                                           .order_by(col(Hl7Message.id))).all() if i is not None]
        for message_id in ids:
            self.put(_Job(message_id, "", None, None))
        return len(ids)

    def run(self) -> None:
        while (batch := take_batch(self.items, MAP_BATCH)) is not None:
            if self.deadline is not None and time.monotonic() > self.deadline:
                return  # stopping: the rows stay pending and are mapped at the next start
            self._map(batch)

    def _map(self, batch: list[_Job]) -> None:
        todo = [job for job in batch if job.remap]
        acks = {job.message_id: job.ack for job in todo if job.ack}
        raws = {job.message_id: job.raw for job in todo if job.raw is not None}
        attempt = 0
        while True:
            try:
                outcomes = (map_messages(self.store, [job.message_id for job in todo], acks=acks, raws=raws)
                            if todo else {})
                break
            except Transient as exc:  # the database is away: this batch again (in order), after a pause
                attempt += 1
                log.warning("mapping batch failed; retrying", extra={"count": len(batch), "reason": exc.code,
                                                                     "attempt": attempt})
                if self.deadline is not None:
                    return  # stopping: the rows stay pending and are mapped at the next start
                time.sleep(min(self.RETRY_MAX, 0.2 * 2 ** min(attempt, 8)))
            except Exception:  # the rows stay pending: mapped at the next start or by `msgate messages replay`
                log.exception("mapping batch failed", extra={"count": len(batch)})
                outcomes = {}
                break
        with self._lock:
            self._queued.difference_update(job.message_id for job in todo)
        stored = self._stored_outcomes([job.message_id for job in batch if not job.remap])
        for job in batch:
            outcome = outcomes.get(job.message_id) if job.remap else stored.get(job.message_id)
            if outcome is not None and outcome.state == "error":
                log.warning("mapping error", extra={"message_id": job.message_id, "reason": outcome.error})
            if job.reply is not None:
                code = None if outcome is None else ("AE" if outcome.state == "error" else "AA")
                self.send({"outcome": [*job.reply, code, (outcome.error or "") if outcome else ""]})

    def _stored_outcomes(self, message_ids: list[int]) -> dict[int, Outcome]:
        """The recorded mapping outcome of rows mapped earlier (none for a row still pending)."""
        if not message_ids:
            return {}
        with self.store.db.session() as session:
            rows = session.exec(select(Hl7Message).where(col(Hl7Message.id).in_(message_ids))).all()
        return {row.id: Outcome(state=row.mapping_state, error=row.mapping_error)  # type: ignore[misc]
                for row in rows if row.mapping_state != "pending"}


class Channel:
    """JSON lines over the socketpair; a reader thread hands server messages to the indexer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.lock = sock, threading.Lock()
        self.lines = sock.makefile("rb")

    def first(self) -> dict[str, Any]:
        line = self.lines.readline()
        if not line:
            raise SystemExit(0)
        return dict(json.loads(line))

    def send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        try:
            with self.lock:
                self.sock.sendall(data)
        except OSError:
            log.warning("hl7 server gone; indexer exits", extra={"role": "hl7"})
            os._exit(0)

    def follow(self, indexer: Indexer) -> None:
        for line in self.lines:
            indexer.on_message(json.loads(line))
        with indexer.cond:
            if indexer.deadline is not None:
                return
        # The server died (SIGKILL, crash): stop at once. What is not committed stays in the journal and is
        # indexed by the next server's indexer, which must not find this one still writing.
        log.warning("hl7 server gone; indexer exits", extra={"role": "hl7"})
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    from msgate.childproc import start_child
    from msgate.storage.store import open_store

    args = sys.argv[1:] if argv is None else argv
    settings = start_child(INDEXER_NICE)
    channel = Channel(socket.socket(fileno=int(args[0])))
    hello = channel.first()
    store = open_store(settings, migrate=False, create_keys=False)
    mapper = Mapper(store, channel.send)
    indexer = Indexer(store, settings.home / "hl7-journal", channel.send, mapper)
    threading.Thread(target=channel.follow, args=(indexer,), name="hl7-indexer-channel", daemon=True).start()
    started = time.monotonic()
    pending = mapper.queue_pending()  # before new rows are stored, so none is queued twice
    mapper.start()
    recovered = indexer.recover(hello)
    channel.send({"ready": recovered})
    log.info("hl7 indexer ready", extra={"role": "hl7", "count": recovered + pending,
                                         "elapsed_s": round(time.monotonic() - started, 2)})
    indexer.run()
    mapper.items.put(None)
    mapper.join(max(1.0, (indexer.deadline or time.monotonic()) - time.monotonic()))
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
