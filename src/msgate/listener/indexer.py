"""Moves journaled instances into the blob store and the index, right behind the acknowledgements.

One thread, fed in journal order by :class:`~msgate.listener.intake.Intake`: consecutive instances are
stored as one batch (``Ingest.index_received``: bodies written, made durable together, indexed in one
transaction), then handed to the readiness tracker, then counted as indexed in their journal segment
(which is deleted once all its records are). An association's end comes through the same queue, after
its instances, so a study is only judged ready on release once everything it received is indexed.

A batch that fails (database unavailable, disk error) is retried with backoff; the journal keeps it in
the meantime, and on restart :meth:`Indexer.recover` indexes what is left before the port opens. The
bytes waiting here are bounded (:meth:`reserve`), so a stalled index slows senders down (and finally
answers 0xA700) instead of growing memory without limit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from msgate.listener import dataset
from msgate.listener.record import decode_record
from msgate.listener.tracking import Tracker
from msgate.storage import repo_studies
from msgate.storage.index_dicom import StoredInstance
from msgate.storage.ingest import Received
from msgate.storage.journal import Journal, read_segment
from msgate.storage.store import Store

log = logging.getLogger(__name__)

MAX_BATCH = 64
MAX_TRIES = 8
LINGER = 0.02  # s: a small batch waits this long for company (per-batch costs: one sync, one transaction)


@dataclass
class _Item:
    segment: str
    received: Received
    tries: int = 0


@dataclass(frozen=True)
class _End:
    assoc_id: str
    outcome: str
    instances: int
    failures: int


class Indexer(threading.Thread):
    def __init__(self, store: Store, journal: Journal, tracker: Tracker, *, max_backlog_bytes: int) -> None:
        super().__init__(name="dicom-indexer", daemon=True)
        self.store, self.journal, self.tracker = store, journal, tracker
        self.max_backlog = max_backlog_bytes
        self.items: queue.SimpleQueue[_Item | _End | None] = queue.SimpleQueue()
        self._room = threading.Condition()
        self._backlog = 0
        self._pending: dict[str, int] = {}  # association id -> instances acknowledged, not yet indexed

    # --- called by the intake and the handlers ------------------------------------------------------

    def reserve(self, size: int, *, timeout: float) -> bool:
        """Count ``size`` bytes as waiting; False if the backlog stayed full for ``timeout`` seconds."""
        with self._room:
            if not self._room.wait_for(lambda: self._backlog == 0 or self._backlog + size <= self.max_backlog,
                                       timeout=timeout):
                return False
            self._backlog += size
            return True

    def release(self, size: int, assoc_id: str | None = None) -> None:
        with self._room:
            self._backlog -= size
            if assoc_id is not None:
                left = self._pending.get(assoc_id, 0) - 1
                if left > 0:
                    self._pending[assoc_id] = left
                else:
                    self._pending.pop(assoc_id, None)
            self._room.notify_all()

    def wait_indexed(self, assoc_id: str, *, timeout: float) -> bool:
        """Block until every instance of the association is indexed (False after ``timeout`` seconds):
        the listener answers a release only then, so what a sender saw acknowledged is visible in the
        index once its association is released."""
        with self._room:
            return self._room.wait_for(lambda: assoc_id not in self._pending, timeout=timeout)

    @property
    def backlog_bytes(self) -> int:
        return self._backlog

    def put_instances(self, segment: str, batch: list[Received]) -> None:
        with self._room:
            for received in batch:
                if received.assoc_id is not None:
                    self._pending[received.assoc_id] = self._pending.get(received.assoc_id, 0) + 1
        for received in batch:
            self.items.put(_Item(segment, received))

    def end_association(self, assoc_id: str, *, outcome: str, instances: int, failures: int) -> None:
        self.items.put(_End(assoc_id, outcome, instances, failures))

    def close(self, timeout: float = 60.0) -> None:
        """Index what is queued, then stop."""
        self.items.put(None)
        self.join(timeout)

    # --- the indexer thread --------------------------------------------------------------------------

    def _take(self) -> list[_Item | _End] | None:
        """The next batch: what is queued, after lingering briefly when that is little."""
        first = self.items.get()
        if first is None:
            return None
        batch: list[_Item | _End] = [first]
        deadline = time.monotonic() + LINGER
        while len(batch) < MAX_BATCH:
            try:
                entry = self.items.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if entry is None:
                self.items.put(None)
                break
            batch.append(entry)
            if isinstance(entry, _End):
                break  # a release is waiting for what came before it
        return batch

    def run(self) -> None:
        while (batch := self._take()) is not None:
            run: list[_Item] = []
            for entry in batch:
                if isinstance(entry, _Item):
                    run.append(entry)
                    continue
                self._index(run)
                run = []
                self._end(entry)
            self._index(run)

    def _index(self, items: list[_Item]) -> None:
        if not items:
            return
        results = self.store.ingest.index_received([i.received for i in items])
        done: dict[str, int] = {}
        for item, result in zip(items, results, strict=True):
            if isinstance(result, Exception):
                self._retry(item, result)
                continue
            self._stored(item.received, result)
            done[item.segment] = done.get(item.segment, 0) + 1
        for segment, count in done.items():
            self.journal.indexed(segment, count)

    def _stored(self, received: Received, stored: StoredInstance) -> None:
        try:
            self.tracker.instance_stored(stored, received.header, assoc_id=received.assoc_id or "",
                                         calling_aet=received.calling_aet)
        except Exception:  # stored and indexed; tracking recovers at the quiet period
            log.exception("tracking failed", extra={"instance_id": stored.instance_id})
        finally:
            received.header.release()
            self.release(len(received.data), received.assoc_id)

    def _retry(self, item: _Item, exc: Exception) -> None:
        item.tries += 1
        if item.tries >= MAX_TRIES:  # left in the journal: indexed again at the next start
            log.error("instance not indexed; it stays in the journal until the next start",
                      extra={"reason": type(exc).__name__, "count": item.tries})
            self.release(len(item.received.data), item.received.assoc_id)
            return
        log.warning("indexing failed; retrying", extra={"reason": type(exc).__name__, "count": item.tries})
        time.sleep(min(10.0, 0.1 * 2 ** item.tries))
        self.items.put(item)

    def _end(self, end: _End) -> None:
        self.tracker.association_ended(end.assoc_id, released=end.outcome == "released")
        try:
            with self.store.db.session() as session:
                repo_studies.close_association(session, assoc_id=end.assoc_id, outcome=end.outcome,
                                               instances=end.instances, failures=end.failures)
        except Exception:
            log.exception("association end not recorded", extra={"assoc_id": end.assoc_id})

    # --- at start ------------------------------------------------------------------------------------

    def recover(self) -> int:
        """Index the segments a crash left (an instance stored already is a duplicate, not stored twice)."""
        total = 0
        for path in self.journal.leftovers():
            received = []
            for raw in read_segment(path, self.store.ring):
                aet, assoc_id, data = decode_record(raw)
                received.append(Received(data, dataset.parse(data), aet, assoc_id))
            for start in range(0, len(received), MAX_BATCH):
                chunk = received[start:start + MAX_BATCH]
                failed = [r for r in self.store.ingest.index_received(chunk, actor="recovery")
                          if isinstance(r, Exception)]
                if failed:
                    raise failed[0]
            total += len(received)
            path.unlink()
        if total:
            log.info("journaled instances indexed after a restart", extra={"count": total})
        return total
