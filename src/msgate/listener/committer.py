"""Group commit of index rows across concurrent associations (persist-then-acknowledge kept).

Each C-STORE handler writes its encrypted body itself (in parallel with the other associations) and
then hands the prepared instance to this committer, which indexes everything queued in one database
transaction and wakes each handler after the commit. Batches form naturally while the previous
commit runs: no instance waits for a timer, and one association alone sees no extra latency.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

from msgate.batching import take_batch
from msgate.storage.ingest import Ingest, PreparedInstance, StoredInstance

log = logging.getLogger(__name__)


class GroupCommitter:
    def __init__(self, ingest: Ingest, *, max_batch: int = 64) -> None:
        self.ingest, self.max_batch = ingest, max_batch
        self._queue: queue.SimpleQueue[tuple[PreparedInstance, Future[StoredInstance]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="dicom-group-commit", daemon=True)
        self._thread.start()

    def commit(self, item: PreparedInstance, timeout: float | None = None) -> StoredInstance:
        """Block until ``item`` is committed; raise what its commit raised."""
        future: Future[StoredInstance] = Future()
        self._queue.put((item, future))
        return future.result(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (batch := take_batch(self._queue, self.max_batch)) is not None:
            try:
                results = self.ingest.commit_instances([item for item, _ in batch])
            except BaseException as exc:  # never leave a handler waiting
                log.exception("group commit failed", extra={"batch": len(batch)})
                results = [exc if isinstance(exc, Exception) else RuntimeError("commit thread")] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
