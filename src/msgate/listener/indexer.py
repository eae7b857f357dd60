"""Moves journaled instances into the blob store and the index, right behind the acknowledgements.

The work runs in a child process (:mod:`msgate.listener.indexproc`), so encrypting bodies and writing
index rows never hold the GIL that the threads receiving instances and answering C-STOREs need. This
side sends it each journaled instance in journal order (:class:`~msgate.listener.intake.Intake` calls
:meth:`Indexer.put_instances` after the group ``fdatasync``) and follows its answers on one thread:
each indexed instance goes to the readiness tracker and is counted as indexed in its journal segment
(deleted once all its records are). An association's end goes through the same channel, after its
instances, so a study is only judged ready on release once everything it received is indexed.

The child retries a batch that fails for a transient reason (the database away, a disk error) with
capped backoff for as long as that lasts, committing the bodies it already wrote; any other failure is
tried a few times, then moved to the journal's encrypted quarantine (:mod:`msgate.listener.quarantine`) and
counted as handled. On restart :meth:`Indexer.recover` indexes what is left before the port opens, and
quarantines what cannot be indexed instead of stopping there: one such record kept the role from ever
starting again. :func:`reindex_quarantined` indexes quarantined records after a fix. A child that dies
is started again and sent what it had not answered. The bytes waiting
here are bounded (:meth:`reserve`), so a stalled index slows senders down (and finally answers 0xA700)
instead of growing memory without limit.
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from msgate import childproc
from msgate.errors import HomeInUse, Transient
from msgate.listener import dataset, quarantine
from msgate.listener.indexproc import MAX_BATCH, SEQ
from msgate.listener.record import decode_record
from msgate.listener.tracking import Tracker
from msgate.storage import audit, heartbeat, reencoded, repo_studies
from msgate.storage.index_dicom import StoredInstance
from msgate.storage.ingest import Received
from msgate.storage.journal import Journal, read_segment
from msgate.storage.store import Store

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
RECOVERY_TRIES = 3  # a failure that is not transient, tried this often at a start before it is quarantined
RECOVERY_PAUSE_S = 0.5


@dataclass
class _Item:
    seq: int
    segment: str
    received: Received
    raw: bytes  # the journal record, sent again if the child dies before answering


@dataclass(frozen=True)
class _End:
    seq: int
    assoc_id: str
    outcome: str
    instances: int
    failures: int


class Indexer:
    def __init__(self, store: Store, journal: Journal, tracker: Tracker, *, max_backlog_bytes: int) -> None:
        self.store, self.journal, self.tracker = store, journal, tracker
        self.max_backlog = max_backlog_bytes
        self._room = threading.Condition()
        self._backlog = 0
        self._pending: dict[str, int] = {}  # association id -> instances acknowledged, not yet indexed
        self._send_lock = threading.Lock()  # sequence numbers, the outstanding queue and the socket, in one order
        self._outstanding: collections.deque[_Item | _End] = collections.deque()
        self._seq = 0
        self._conn: Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._follower: threading.Thread | None = None
        self._closing = False
        self.restarts = 0
        self.quarantined = 0  # records in the quarantine: reported with the role's heartbeat (status: degraded)

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

    def put_instances(self, segment: str, batch: list[Received], raws: list[bytes]) -> None:
        """Journaled (and fsynced) instances, with their journal records, in journal order."""
        with self._room:
            for received in batch:
                if received.assoc_id is not None:
                    self._pending[received.assoc_id] = self._pending.get(received.assoc_id, 0) + 1
        with self._send_lock:
            for received, raw in zip(batch, raws, strict=True):
                self._seq += 1
                item = _Item(self._seq, segment, received, raw)
                self._outstanding.append(item)
                self._send(b"I" + SEQ.pack(item.seq) + raw)

    def end_association(self, assoc_id: str, *, outcome: str, instances: int, failures: int) -> None:
        with self._send_lock:
            self._seq += 1
            end = _End(self._seq, assoc_id, outcome, instances, failures)
            self._outstanding.append(end)
            self._send(b"E" + SEQ.pack(end.seq))

    def _send(self, msg: bytes) -> None:
        """Under the send lock. A dead child is noticed by the follower, which sends everything again."""
        if self._conn is None:
            return
        try:
            self._conn.send_bytes(msg)
        except OSError:
            pass

    # --- the child process ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the indexer process and follow its answers; returns once it is ready."""
        with self._send_lock:
            self._spawn()
        self._follower = threading.Thread(target=self._follow, name="dicom-indexer", daemon=True)
        self._follower.start()

    def _spawn(self) -> None:
        """Under the send lock: a new child, then everything it has to answer."""
        ours, theirs = socket.socketpair()
        try:
            proc = childproc.spawn("msgate.listener.indexproc", theirs, self.store.settings)
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        ready = conn.poll(START_TIMEOUT_S) and self._first(conn)
        if not ready:
            conn.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            raise Transient("dicom indexer process did not start (see its log)", code="indexer_start")
        self._conn, self._proc = conn, proc
        for entry in self._outstanding:
            if isinstance(entry, _Item):
                self._send(b"I" + SEQ.pack(entry.seq) + entry.raw)
            else:
                self._send(b"E" + SEQ.pack(entry.seq))

    @staticmethod
    def _first(conn: Connection) -> bool:
        try:
            return bool(json.loads(conn.recv_bytes()).get("ready"))
        except (EOFError, OSError, ValueError):
            return False

    def _follow(self) -> None:
        while True:
            conn = self._conn
            try:
                assert conn is not None
                answers = json.loads(conn.recv_bytes())["r"]
            except (EOFError, OSError, ValueError, KeyError, AssertionError):
                if self._closing:
                    return
                self._restart()
                continue
            try:
                self._answered(answers)
            except Exception:  # never let the follower die: the journal keeps what was not counted
                log.exception("indexer answer not applied")

    def _restart(self) -> None:
        code = self._proc.poll() if self._proc is not None else None
        log.error("dicom indexer exited; starting it again",
                  extra={"role": "dicom", "code": code, "attempt": self.restarts})
        while not self._closing:
            time.sleep(RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)])
            self.restarts += 1
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait(10)
            try:
                with self._send_lock:
                    if self._conn is not None:
                        self._conn.close()
                    self._conn = None
                    self._spawn()
                log.info("dicom indexer running again", extra={"role": "dicom", "count": len(self._outstanding)})
                return
            except Exception:
                log.exception("dicom indexer did not start again", extra={"attempt": self.restarts})

    def _answered(self, answers: list[list[object]]) -> None:
        done: dict[str, int] = {}
        for answer in answers:
            seq = int(answer[0])  # type: ignore[call-overload]
            with self._send_lock:
                if not self._outstanding or self._outstanding[0].seq != seq:
                    log.warning("indexer answer out of order; ignored", extra={"count": seq})
                    continue
                entry = self._outstanding.popleft()
            if isinstance(entry, _End):
                self._flush(done)
                self._end(entry)
            elif answer[1] == 1:
                self._stored(entry.received, StoredInstance(*answer[2:]))  # type: ignore[arg-type]
                done[entry.segment] = done.get(entry.segment, 0) + 1
            elif answer[1] == 3:  # quarantined (durable, audited): handled, so its segment can go
                self.release(len(entry.received.data), entry.received.assoc_id)
                done[entry.segment] = done.get(entry.segment, 0) + 1
                self.quarantined += 1
                heartbeat.set_info("dicom", quarantined=self.quarantined)
            else:  # not even quarantined: left in the journal, indexed again at the next start
                self.release(len(entry.received.data), entry.received.assoc_id)
        self._flush(done)

    def _flush(self, done: dict[str, int]) -> None:
        for segment, count in done.items():
            self.journal.indexed(segment, count)
        done.clear()

    def close(self, timeout: float = 60.0) -> None:
        """Index what is queued, then stop (what is left after ``timeout`` stays in the journal)."""
        with self._send_lock:
            self._closing = True
            self._send(b"S")
        if self._follower is not None:
            self._follower.join(timeout)
        if self._proc is not None:
            try:
                self._proc.wait(max(1.0, timeout / 6))
            except subprocess.TimeoutExpired:
                log.warning("dicom indexer did not stop in time; killed", extra={"role": "dicom"})
                self._proc.kill()
                self._proc.wait(10)
        if self._conn is not None:
            self._conn.close()
        if self._outstanding:
            log.warning("instances left in the journal at shutdown; indexed at the next start",
                        extra={"count": sum(isinstance(e, _Item) for e in self._outstanding)})

    # --- the follower thread -------------------------------------------------------------------------

    def _stored(self, received: Received, stored: StoredInstance) -> None:
        try:
            self.tracker.instance_stored(stored, received.header, assoc_id=received.assoc_id or "",
                                         calling_aet=received.calling_aet)
        except Exception:  # stored and indexed; tracking recovers at the quiet period
            log.exception("tracking failed", extra={"instance_id": stored.instance_id})
        finally:
            received.header.release()
            self.release(len(received.data), received.assoc_id)

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
        """Index the segments a crash left (an instance stored already is a duplicate, not stored twice).

        A record that still fails after :data:`RECOVERY_TRIES` for a reason that is not transient is
        quarantined and recovery goes on (it raised here, on every start: the port never opened again).
        A transient failure (the database away) raises: the records stay for the next start."""
        total = 0
        for path in self.journal.leftovers():
            raws = read_segment(path, self.store.ring)
            for start in range(0, len(raws), MAX_BATCH):
                chunk = raws[start:start + MAX_BATCH]
                results = index_journaled(self.store, chunk, actor="recovery")
                for raw, result in zip(chunk, results, strict=True):
                    if isinstance(result, Exception):
                        quarantine.put(self.store, raw, reason=quarantine.reason_of(result), actor="recovery",
                                       segment=path.name)
            total += len(raws)
            path.unlink()
        if total:
            log.info("journaled instances indexed after a restart", extra={"count": total})
        self.quarantined = quarantine.count(self.store.settings.home)
        heartbeat.set_info("dicom", quarantined=self.quarantined or None)
        if self.quarantined:
            log.error("received instances wait in the quarantine; fix the cause, then run msgate studies "
                      "quarantine --reindex", extra={"count": self.quarantined, "role": "dicom"})
        return total


def index_journaled(store: Store, raws: list[bytes], *, actor: str, tries: int = RECOVERY_TRIES
                    ) -> list[StoredInstance | Exception]:
    """Index journal records outside the listener (recovery, re-indexing from the quarantine); one result
    each. A failure that is not transient is tried ``tries`` times, then returned; a transient one raises
    (after what was stored is followed up: reopened studies, re-encoded versions)."""
    results: list[StoredInstance | Exception] = [Exception("not tried")] * len(raws)
    items: dict[int, Received] = {}
    for n, raw in enumerate(raws):
        try:
            aet, assoc_id, data = decode_record(raw)
            items[n] = Received(data, dataset.parse(data), aet, assoc_id)
        except Exception as exc:  # noqa: BLE001 - not an instance (it was parsed when received): quarantined
            results[n] = exc
    todo = sorted(items)
    for attempt in range(tries):
        if attempt:
            time.sleep(RECOVERY_PAUSE_S * attempt)
        for n, result in zip(todo, store.ingest.index_received([items[n] for n in todo], actor=actor), strict=True):
            results[n] = result
        todo = [n for n in todo if isinstance(results[n], Exception)]
        if not todo or any(isinstance(results[n], Transient) for n in todo):
            break
    stored = [r for r in results if isinstance(r, StoredInstance)]
    _reopen(store, [r for r in stored if not r.duplicate], actor)
    reencoded.settle(store, [r.instance_id for r in stored if r.version > 1], actor=actor)
    for n in todo:
        if isinstance(results[n], Transient):
            raise results[n]
    return results


def _reopen(store: Store, stored: list[StoredInstance], actor: str) -> None:
    """New instances for a study that had finished (ready, stable) before: it is receiving again, so the
    tracker of the next start (``load_open``) decides it anew, as a live instance would."""
    studies = sorted({s.study_id for s in stored if not s.new_study})
    if not studies:
        return
    with store.db.session() as session:
        for study_id in studies:
            if repo_studies.reopen(session, study_id=study_id, actor=actor):
                log.info("study reopened", extra={"study_id": study_id})


@dataclass(frozen=True)
class Reindexed:
    id: str
    instance_ids: list[int]
    error: str | None  # None: indexed, and removed from the quarantine

    def doc(self) -> dict[str, object]:
        return {"id": self.id, "instance_ids": self.instance_ids, "error": self.error}


def reindex_quarantined(store: Store, ids: list[str] | None = None, *, actor: str | None = None) -> list[Reindexed]:
    """Index quarantined records (all, or those ``ids``) after the cause was fixed; each one indexed is
    audited ``instance.reindexed`` and only then removed from the quarantine. One that fails again stays.

    Only with the dicom role stopped on this home (its journal lock is taken here, else
    :class:`HomeInUse`): its next start decides the studies these instances went into."""
    home, actor = store.settings.home, actor or audit.operator()
    try:
        lock = Journal(home / quarantine.JOURNAL_FOLDER, store.ring)
    except HomeInUse:
        raise HomeInUse("the dicom role is running on this home: stop it, re-index the quarantine, then start it "
                        "again (its start decides the studies)") from None
    out: list[Reindexed] = []
    try:
        wanted = quarantine.entries(home)
        if ids is not None:
            known = {e.id for e in wanted}
            out += [Reindexed(qid, [], "not in the quarantine") for qid in ids if qid not in known]
            wanted = [e for e in wanted if e.id in set(ids)]
        for entry in wanted:
            raws = read_segment(entry.path, store.ring)
            if not raws:  # its write was cut short: put() never returned, the journal kept the record
                quarantine.remove(home, entry.id)
                out.append(Reindexed(entry.id, [], "empty (removed)"))
                continue
            results = index_journaled(store, raws, actor=actor, tries=1)
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                out.append(Reindexed(entry.id, [], quarantine.reason_of(failed[0])))
                continue
            stored = [r for r in results if isinstance(r, StoredInstance)]
            instance_ids = [r.instance_id for r in stored]
            with store.db.session() as session:
                audit.append(session, kind="instance.reindexed", actor=actor, subject=f"quarantine:{entry.id}",
                             detail={"instance_ids": instance_ids, "study_ids": sorted({r.study_id for r in stored})})
            quarantine.remove(home, entry.id)
            out.append(Reindexed(entry.id, instance_ids, None))
    finally:
        lock.close()
    if out:
        log.info("quarantine re-indexed", extra={"count": sum(r.error is None for r in out), "role": "dicom"})
    return out
