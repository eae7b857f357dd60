"""Scheduled retention: the scheduler role applies ``storage.retention_days`` and ``purge_free_bytes`` itself.

A full purge (:func:`msgate.storage.retention.purge`, both policies) runs every ``storage.purge_interval_s``,
the first one a check period after the start. The free-space policy reacts faster: with the local blob
backend, free space under the blob folder is measured every ``min(purge_interval_s, 60)`` s, and a purge
runs at once when it is under ``purge_free_bytes``. Each purge restarts the interval. ``purge_interval_s``
0 turns it off (``msgate db purge`` only).

A failed purge or measurement is logged (exception type and stack only) and tried again at the next
check; it never stops the scheduler. A run that purged something logs one ``retention.purged`` line of
counts. Several scheduler processes: a run skips while another purge holds the guard
(:func:`msgate.storage.retention.exclusive`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from msgate.storage import retention
from msgate.storage.blobs import free_bytes
from msgate.storage.retention import PurgeReport
from msgate.storage.store import Store

log = logging.getLogger(__name__)
MAX_CHECK_S = 60.0


class RetentionSchedule:
    """When to purge, on a monotonic clock the caller passes in; :meth:`step` runs what is due."""

    def __init__(self, *, interval: float, purge: Callable[[], PurgeReport], start: float,
                 free: Callable[[], int] | None = None, floor: int = 0) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive (0 turns scheduled retention off)")
        self.interval, self.check_every = interval, min(interval, MAX_CHECK_S)
        self.purge, self.free, self.floor = purge, (free if floor > 0 else None), floor
        self.next_purge = self.next_check = start + self.check_every

    def step(self, now: float) -> float:
        """Run a purge if one is due (the interval, or free space under the floor); seconds to wait."""
        due = now >= self.next_purge
        if not due and self.free is not None and now >= self.next_check:
            self.next_check = now + self.check_every
            try:
                due = self.free() < self.floor
            except Exception:
                log.exception("retention: free space could not be measured; checked again later")
        if due:
            self.next_purge, self.next_check = now + self.interval, now + self.check_every
            self._run()
        upcoming = self.next_purge if self.free is None else min(self.next_purge, self.next_check)
        return max(upcoming - now, 0.01)

    def _run(self) -> None:
        try:
            report = self.purge()
        except Exception:
            log.exception("retention purge failed; tried again at the next interval")
            return
        if report.skipped:
            log.debug("retention: another purge is running; skipped")
        elif report.studies or report.engine_texts:
            log.info("retention.purged", extra={
                "studies": len(report.studies), "blobs": report.blobs, "bytes": report.bytes,
                "by_age": report.by_age, "by_space": report.by_space, "engine_texts": report.engine_texts})


def for_store(store: Store, stop: threading.Event) -> RetentionSchedule:
    storage = store.settings.storage
    local = storage.blob_backend == "local"  # PostgreSQL bodies: the space is the database's (retention.py)
    return RetentionSchedule(
        interval=storage.purge_interval_s, start=time.monotonic(),
        purge=lambda: retention.purge(store, wait=False, stop=stop),
        free=(lambda: free_bytes(store.settings.blob_dir)) if local else None, floor=storage.purge_free_bytes)


def start(store: Store, stop: threading.Event) -> threading.Thread | None:
    """Start scheduled retention in a thread of its own (a long purge never holds up job planning);
    None when ``purge_interval_s`` is 0. The thread ends when ``stop`` is set."""
    if store.settings.storage.purge_interval_s <= 0:
        return None
    schedule = for_store(store, stop)

    def loop() -> None:
        while not stop.wait(schedule.step(time.monotonic())):
            pass

    thread = threading.Thread(target=loop, name="retention", daemon=True)
    thread.start()
    return thread
