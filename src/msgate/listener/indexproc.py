"""The DICOM indexer process: stores and indexes journaled instances outside the listener's interpreter.

``python -m msgate.listener.indexproc FD`` with the settings as JSON on stdin (never argv: they may hold
a database password); FD is its end of a socketpair to the listener (:class:`msgate.listener.indexer.Indexer`).
Its work (encrypting blob bodies, syncing them, one SQL transaction per batch) used to run on a thread of
the listener and competed for the GIL with the threads that receive instances and answer C-STOREs.

Messages (``multiprocessing.connection`` framing), listener to here:

* ``I`` + sequence (8 bytes) + a journal record (:mod:`msgate.listener.record`): store and index it;
* ``E`` + sequence: an association ended: index what came before at once (no lingering), then echo it;
* ``S``: index what is queued, answer it, exit.

Here to the listener: ``{"ready": true}`` once the store is open, then ``{"r": [...]}`` per batch, in the
order received: ``[seq, 1, instance_id, study_id, series_id, duplicate, version, new_series, new_study, moved_from]``
(indexed), ``[seq, 3, quarantine id]`` (a failure that is not transient, after :data:`MAX_TRIES`, or an
instance that cannot be parsed: moved to the encrypted quarantine, :mod:`msgate.listener.quarantine`, and
audited; transient ones, a database outage, are retried while they last), ``[seq, 0, reason]`` (that
quarantine could not be written: the record stays in the journal for the next start) or ``[seq, 2]`` (an
association end, everything before it answered). The listener owns the journal: a segment is deleted there
once every record in it is answered as indexed or quarantined. If this process dies, the listener starts
another and sends again what was not answered (a record stored twice is a duplicate).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import struct
import sys
import threading
import time
from multiprocessing.connection import Connection

from msgate.errors import Transient
from msgate.listener import dataset, quarantine
from msgate.listener.record import decode_record, encode_record
from msgate.storage import reencoded
from msgate.storage.index_dicom import PreparedInstance, StoredInstance
from msgate.storage.ingest import Received
from msgate.storage.store import Store

log = logging.getLogger(__name__)

MAX_BATCH = 64
MAX_TRIES = 8  # for failures that are not Transient; a Transient one is retried while it lasts
MAX_BACKOFF = 30.0  # s between two tries of a batch the database keeps refusing
LINGER = 0.02  # s: a small batch waits this long for company (per-batch costs: one sync, one transaction)
INDEXER_NICE = 5  # below the listener that answers senders; far above `nice -n 19` batch jobs
SEQ = struct.Struct(">Q")

Entry = tuple[int, Received | None]  # (sequence, instance) or (sequence, None) for an association end


def _read(conn: Connection, items: queue.SimpleQueue[Entry | str | None]) -> None:
    """Reader thread: the socket never fills while a batch is being indexed."""
    try:
        while True:
            msg = conn.recv_bytes()
            kind = msg[:1]
            if kind == b"S":
                items.put("stop")
                return
            (seq,) = SEQ.unpack_from(msg, 1)
            if kind == b"E":
                items.put((seq, None))
                continue
            aet, assoc_id, data = decode_record(msg[1 + SEQ.size:])
            try:
                header = dataset.parse(data)
            except Exception:  # noqa: BLE001 - the listener parsed it already; report, never crash
                items.put((seq, Received(data, None, aet, assoc_id)))  # type: ignore[arg-type]
                continue
            items.put((seq, Received(data, header, aet, assoc_id)))
    except (EOFError, OSError):
        items.put(None)  # the listener is gone: index what is queued, then exit


class Worker:
    def __init__(self, store: Store, conn: Connection) -> None:
        self.store, self.conn = store, conn
        self.parent = os.getppid()
        self.items: queue.SimpleQueue[Entry | str | None] = queue.SimpleQueue()

    def take(self) -> tuple[list[Entry], bool]:
        """The next batch (ending at an association end, if one comes) and whether to stop after it."""
        first = self.items.get()
        if first is None or first == "stop":
            return [], True
        batch: list[Entry] = [first]  # type: ignore[list-item]
        if first[1] is None:  # type: ignore[index]
            return batch, False
        deadline = time.monotonic() + LINGER
        while len(batch) < MAX_BATCH:
            try:
                entry = self.items.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if entry is None or entry == "stop":
                return batch, True
            batch.append(entry)  # type: ignore[arg-type]
            if entry[1] is None:  # type: ignore[index]
                break  # a release is waiting for what came before it
        return batch, False

    def run(self) -> None:
        """Two stages, so one batch's bodies are written while the previous batch's transaction commits:
        this thread takes batches and writes their bodies; the committer indexes and answers, in order."""
        handoff: queue.Queue[tuple[list[Entry], list[PreparedInstance] | Exception | None] | None] = queue.Queue(2)
        committer = threading.Thread(target=self._commit_loop, args=(handoff,), name="dicom-index-commit",
                                     daemon=True)
        committer.start()
        while True:
            batch, stop = self.take()
            if batch:
                handoff.put((batch, self.prepare(batch)))
            if stop:
                break
        handoff.put(None)
        committer.join()

    def prepare(self, batch: list[Entry]) -> list[PreparedInstance] | Exception | None:
        """The batch's bodies, written and synced (file bodies); None where the commit writes them."""
        todo = [r for _, r in batch if r is not None and r.header is not None]
        if not todo or not self.store.ingest.can_group_commit:
            return None
        try:
            return self.store.ingest.prepare_received(todo)
        except OSError as exc:
            return exc

    def _commit_loop(self, handoff: queue.Queue[tuple[list[Entry], list[PreparedInstance] | Exception | None]
                                                | None]) -> None:
        try:
            while (entry := handoff.get()) is not None:
                answers = self.index(*entry)
                self.conn.send_bytes(json.dumps({"r": answers}, separators=(",", ":")).encode())
        except (BrokenPipeError, ConnectionError, OSError):
            os._exit(0)  # the listener is gone; what it had not seen answered is still in its journal

    def index(self, batch: list[Entry], prepared: list[PreparedInstance] | Exception | None = None
              ) -> list[list[object]]:
        """Index one batch; the answers in batch order.

        A Transient failure (the database away, a deadlock, a COMMIT whose answer was lost) is retried
        with capped backoff for as long as it lasts: giving up left acknowledged instances out of the
        index until the next start while their study went ready without them. The retry commits the
        bodies already written (a COMMIT that did reach the server finds its rows: duplicates). Any
        other failure is quarantined after :data:`MAX_TRIES` (:meth:`_quarantine`)."""
        answers: dict[int, list[object]] = {}
        todo: list[tuple[int, Received, PreparedInstance | None]] = []
        bodies = iter(prepared) if isinstance(prepared, list) else None
        for seq, received in batch:
            if received is None:
                answers[seq] = [seq, 2]
            elif received.header is None:  # the listener parsed it, so this cannot change: quarantined now
                answers[seq] = self._quarantine(seq, received, "unparsable")
            else:
                todo.append((seq, received, next(bodies) if bodies is not None else None))
        tries = 0
        versions: list[int] = []  # later versions of an instance: compared with the ones they replace, below
        first_error: Exception | None = prepared if isinstance(prepared, Exception) else None
        while todo:
            results = self._attempt(todo, first_error)
            first_error = None
            failed: list[tuple[int, Received, PreparedInstance | None, Exception]] = []
            for (seq, received, body), result in zip(todo, results, strict=True):
                if isinstance(result, StoredInstance):
                    answers[seq] = [seq, 1, result.instance_id, result.study_id, result.series_id,
                                    result.duplicate, result.version, result.new_series, result.new_study,
                                    result.moved_from]
                    if result.version > 1:
                        versions.append(result.instance_id)
                    received.header.release()
                else:  # a body kept for a transient failure is committed again; any other was discarded
                    failed.append((seq, received, body if isinstance(result, Transient) else None, result))
            tries += 1
            permanent = [f for f in failed if not isinstance(f[3], Transient)]
            if permanent and tries >= MAX_TRIES:
                log.error("instances not indexed after retries; quarantined",
                          extra={"reason": _reason(permanent[0][3]), "count": len(permanent)})
                for seq, received, _, error in permanent:
                    answers[seq] = self._quarantine(seq, received, quarantine.reason_of(error))
                failed = [f for f in failed if isinstance(f[3], Transient)]
            if failed:
                log.warning("indexing failed; retrying", extra={"reason": _reason(failed[0][3]), "count": tries,
                                                                "batch": len(failed)})
                if os.getppid() != self.parent:  # the listener is gone (it keeps the batch in its journal),
                    log.warning("dicom listener gone; indexer exits", extra={"role": "dicom"})
                    os._exit(0)  # and stop signals are ignored here: never linger as an orphan
                time.sleep(min(MAX_BACKOFF, 0.1 * 2 ** min(tries, 10)))
            todo = [(seq, received, body) for seq, received, body, _ in failed]
        if versions:  # decided before the listener hears of them, so before their study can be ready again
            reencoded.settle(self.store, versions)
        return [answers[seq] for seq, _ in batch]

    def _quarantine(self, seq: int, received: Received, reason: str) -> list[object]:
        """Move a record that cannot be indexed to the quarantine: its journal segment can then go, and
        the next start no longer stops on it. If that fails too, it stays in the journal."""
        try:
            qid = quarantine.put(self.store, encode_record(received), reason=reason, actor="listener")
        except Exception as exc:  # noqa: BLE001 - the journal still holds it
            log.error("instance not quarantined; it stays in the journal until the next start",
                      extra={"reason": _reason(exc), "assoc_id": received.assoc_id})
            return [seq, 0, reason]
        return [seq, 3, qid]

    def _attempt(self, todo: list[tuple[int, Received, PreparedInstance | None]], error: Exception | None
                 ) -> list[StoredInstance | Exception]:
        """One try: commit the bodies already written; write the others first (file bodies), or store
        them within the transaction (PostgreSQL bodies)."""
        if error is not None:
            return [error] * len(todo)
        ingest = self.store.ingest
        if not ingest.can_group_commit:
            return ingest.index_received([received for _, received, _ in todo])
        missing = [i for i, (_, _, body) in enumerate(todo) if body is None]
        bodies = [body for _, _, body in todo]
        if missing:
            try:
                written = ingest.prepare_received([todo[i][1] for i in missing])
            except OSError as exc:
                return [Transient(f"blob write failed ({type(exc).__name__})", code="blob_io")] * len(todo)
            for i, body in zip(missing, written, strict=True):
                bodies[i] = body
        results = ingest.commit_instances(bodies, keep_on_transient=True)  # type: ignore[arg-type]
        for i, result in enumerate(results):  # keep what was written for the next try
            if isinstance(result, Transient):
                todo[i] = (todo[i][0], todo[i][1], bodies[i])
        return results


def _reason(exc: Exception) -> str:
    """What a log line may say about a failure: its code (``db_unavailable``), never its message."""
    return str(getattr(exc, "code", "") or type(exc).__name__)


def main(argv: list[str] | None = None) -> int:
    from msgate.childproc import settle_heap, start_child
    from msgate.storage.store import open_store

    args = sys.argv[1:] if argv is None else argv
    settings = start_child(INDEXER_NICE)
    conn = Connection(socket.socket(fileno=int(args[0])).detach())
    store = open_store(settings, migrate=False, create_keys=False)
    settle_heap()
    try:
        worker = Worker(store, conn)
        threading.Thread(target=_read, args=(conn, worker.items), name="dicom-indexer-reader", daemon=True).start()
        conn.send_bytes(b'{"ready":true}')
        worker.run()
    except (BrokenPipeError, ConnectionError):
        pass  # the listener is gone; what was not answered is still in its journal
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
