"""Event handlers: C-ECHO, C-STORE (persist, then acknowledge), and the association life cycle.

Status codes (PS3.4 §B.2.3, §GG.4): ``0x0000`` only after the instance is durable, encrypted, in the
commit journal (:mod:`msgate.listener.intake`; the indexer stores and indexes it right behind);
``0xA700`` out of resources (disk floor, journal write failed, indexing backlog full); ``0xA900``
dataset does not match the SOP class (a required UID missing); ``0xC210`` cannot understand
(undecodable or truncated); ``0xC000`` any other failure. No exception leaves a handler.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import evt

from msgate.errors import Rejected, Transient
from msgate.listener import dataset
from msgate.listener.indexer import Indexer
from msgate.listener.intake import Intake
from msgate.storage import repo_studies
from msgate.storage.ingest import Received
from msgate.storage.models import new_id
from msgate.storage.store import Store

log = logging.getLogger(__name__)

SUCCESS, OUT_OF_RESOURCES, DATA_SET_MISMATCH, CANNOT_UNDERSTAND, FAILURE = 0x0000, 0xA700, 0xA900, 0xC210, 0xC000
RELEASE_WAIT = 30.0  # seconds a release waits for indexing; the instances are durable in the journal either way


def status_for(exc: Rejected) -> int:
    """The DIMSE failure status of a rejected dataset."""
    if exc.code.startswith("missing_") or exc.code in ("instance_uid_mismatch", "class_uid_mismatch"):
        return DATA_SET_MISMATCH
    if exc.code in ("undecodable", "truncated"):
        return CANNOT_UNDERSTAND
    return FAILURE


@dataclass
class _AssocStats:
    assoc_id: str
    calling_aet: str
    instances: int = 0
    failures: int = 0


@dataclass
class Listener:
    """Shared state of the handlers: the store, the journal intake, the indexer, per-association counters."""

    store: Store
    intake: Intake
    indexer: Indexer
    stats: dict[int, _AssocStats] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_RELEASED, self.on_ended, ["released"]),
            (evt.EVT_ABORTED, self.on_ended, ["aborted"]),
            (evt.EVT_CONN_CLOSE, self.on_closed),
            (evt.EVT_REJECTED, self.on_rejected),
        ]

    # --- C-ECHO / C-STORE ---------------------------------------------------------------------------

    def on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def on_store(self, event: evt.Event) -> int:
        """EVT_C_STORE (pynetdicom's path): store the bytes as received (no transcoding), then answer.
        pynetdicom hands any request on a storage context here (an N-CREATE too): that is aborted."""
        if type(event.request).__name__ != "C_STORE":
            log.warning("association aborted: a request that is not C-STORE on a storage context",
                        extra={"assoc_id": self._stats(event.assoc).assoc_id,
                               "reason": type(event.request).__name__})
            event.assoc.abort()
            return FAILURE
        try:
            data = event.encoded_dataset()
        except Exception:
            log.exception("store failed", extra={"assoc_id": self._stats(event.assoc).assoc_id})
            return self._failed(self._stats(event.assoc), FAILURE, "internal")
        request = event.request
        return self.store_encoded(data, event.assoc, str(event.context.transfer_syntax),
                                  (str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or "")))

    def store_encoded(self, data: bytes, assoc: Any, transfer_syntax: str, affected: tuple[str, str]) -> int:
        """Persist one received dataset (file meta + data set, as sent) and return the DIMSE status.
        ``affected``: the C-STORE-RQ's Affected SOP Class and Instance UIDs, which the data set must carry
        (the sender records the command's instance as stored, the index the data set's).

        Called by pynetdicom's EVT_C_STORE and by the direct data phase (``listener.dataphase``)."""
        started = time.perf_counter()
        stats = self._stats(assoc)
        try:
            self.store.ingest.check_space()
            header = dataset.parse(data)
            _matches_command(header, affected)
            self.intake.accept(Received(data, header, stats.calling_aet, stats.assoc_id))
        except Rejected as exc:
            return self._failed(stats, status_for(exc), exc.code)
        except Transient as exc:
            return self._failed(stats, OUT_OF_RESOURCES, exc.code)
        except OSError as exc:
            log.exception("store failed", extra={"assoc_id": stats.assoc_id})
            return self._failed(stats, OUT_OF_RESOURCES, type(exc).__name__)
        except Exception:
            log.exception("store failed", extra={"assoc_id": stats.assoc_id})
            return self._failed(stats, FAILURE, "internal")
        stats.instances += 1
        log.debug("instance journaled", extra={"assoc_id": stats.assoc_id, "status": 0,
                                               "duration_ms": round((time.perf_counter() - started) * 1e3, 2)})
        return SUCCESS

    def _failed(self, stats: _AssocStats, status: int, reason: str) -> int:
        stats.failures += 1
        log.warning("instance refused", extra={"status": f"0x{status:04X}", "reason": reason,
                                               "assoc_id": stats.assoc_id})
        return status

    # --- association life cycle ------------------------------------------------------------------------

    def _stats(self, assoc: Any) -> _AssocStats:
        """The association's counters, made by whichever thread sees it first: the data phase runs on
        the DUL thread and can store instances before the reactor thread has run EVT_ESTABLISHED."""
        with self.lock:
            stats = self.stats.get(id(assoc))
            if stats is None:
                stats = _AssocStats(new_id(), _aet(assoc))
                self.stats[id(assoc)] = stats
            return stats

    def on_established(self, event: evt.Event) -> None:
        stats = self._stats(event.assoc)
        try:
            with self.store.db.session() as session:
                repo_studies.open_association(session, assoc_id=stats.assoc_id, calling_aet=stats.calling_aet,
                                              peer_host=str(event.assoc.requestor.address))
        except Exception:
            log.exception("association not recorded", extra={"assoc_id": stats.assoc_id})
        log.info("association established", extra={"assoc_id": stats.assoc_id, "calling_aet": stats.calling_aet})

    def before_release(self, assoc: Any) -> None:
        """The association's A-RELEASE-RQ arrived: answer it once its instances are indexed (bounded)."""
        with self.lock:
            stats = self.stats.get(id(assoc))
        if stats is not None and not self.indexer.wait_indexed(stats.assoc_id, timeout=RELEASE_WAIT):
            log.warning("release answered before indexing caught up", extra={"assoc_id": stats.assoc_id})

    def on_ended(self, event: evt.Event, outcome: str) -> None:
        self._end(event.assoc, outcome)

    def _end(self, assoc: Any, outcome: str) -> None:
        with self.lock:
            stats = self.stats.pop(id(assoc), None)
        if stats is None:
            return
        self.indexer.end_association(stats.assoc_id, outcome=outcome, instances=stats.instances,
                                     failures=stats.failures)
        log.info("association ended", extra={"assoc_id": stats.assoc_id, "state": outcome,
                                             "count": stats.instances})

    def on_closed(self, event: evt.Event) -> None:
        """Transport closed: a release or abort event normally ends the association first, but it can
        race the close; whatever is still open half a second later ended without release or abort."""
        assoc = event.assoc
        timer = threading.Timer(0.5, self._end_if_open, args=(assoc,))
        timer.daemon = True
        timer.start()

    def _end_if_open(self, assoc: Any) -> None:
        outcome = "released" if getattr(assoc, "is_released", False) else (
            "aborted" if getattr(assoc, "is_aborted", False) else "closed")
        self._end(assoc, outcome)

    def on_rejected(self, event: evt.Event) -> None:
        log.warning("association rejected", extra={"calling_aet": _aet(event.assoc),
                                                   "peer": str(event.assoc.requestor.address)})


def _matches_command(header: dataset.Header, affected: tuple[str, str]) -> None:
    """PS3.4 B.2.3 (0xA900): the data set's SOP Class and Instance UIDs are the command's. A data set
    without SOP Instance UID was refused already; one without SOP Class UID takes the command's."""
    sop_class, sop_instance = affected
    if header.get("SOPInstanceUID") != sop_instance:
        raise Rejected("the data set's SOP Instance UID is not the command's Affected SOP Instance UID",
                       code="instance_uid_mismatch")
    if header.get("SOPClassUID") and header.get("SOPClassUID") != sop_class:
        raise Rejected("the data set's SOP Class UID is not the command's Affected SOP Class UID",
                       code="class_uid_mismatch")


def _aet(assoc: Any) -> str:
    title = assoc.requestor.ae_title
    return (title.decode(errors="replace") if isinstance(title, bytes) else str(title or "")).strip()
