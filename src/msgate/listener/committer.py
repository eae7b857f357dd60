"""Group commit of index rows across concurrent associations (persist-then-acknowledge kept).

Each C-STORE handler writes its encrypted body itself (in parallel with the other associations) and
then calls :meth:`GroupCommitter.commit`. The first caller to find no commit running becomes the
*leader*: it indexes everything queued in one database transaction, hands each waiting handler its
result, and repeats while more arrived meanwhile. The others wait for their result. Batches form
while the previous commit runs; one association alone commits on its own thread, with no hand-off.
"""

from __future__ import annotations

import logging
import threading

from msgate.storage.index_dicom import PreparedInstance, StoredInstance
from msgate.storage.ingest import Ingest

log = logging.getLogger(__name__)


class _Entry:
    __slots__ = ("item", "result", "done")

    def __init__(self, item: PreparedInstance) -> None:
        self.item = item
        self.result: StoredInstance | BaseException | None = None
        self.done = False


class GroupCommitter:
    def __init__(self, ingest: Ingest, *, max_batch: int = 64) -> None:
        self.ingest, self.max_batch = ingest, max_batch
        self._cond = threading.Condition()
        self._queue: list[_Entry] = []
        self._leading = False

    def commit(self, item: PreparedInstance) -> StoredInstance:
        """Block until ``item`` is committed (leading a commit if none is running); raise what it raised."""
        entry = _Entry(item)
        with self._cond:
            self._queue.append(entry)
            while not entry.done:
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
                self._cond.release()
                try:
                    self._commit(batch)
                finally:
                    self._cond.acquire()
                    self._leading = False
                    self._cond.notify_all()
        if isinstance(entry.result, BaseException):
            raise entry.result
        assert entry.result is not None
        return entry.result

    def _commit(self, batch: list[_Entry]) -> None:
        try:
            results: list[StoredInstance | Exception] = self.ingest.commit_instances([e.item for e in batch])
        except BaseException as exc:  # never leave a handler waiting
            log.exception("group commit failed", extra={"batch": len(batch)})
            results = [exc if isinstance(exc, Exception) else RuntimeError("commit failed")] * len(batch)
        for entry, result in zip(batch, results, strict=True):
            entry.result, entry.done = result, True

    def close(self) -> None:
        """Nothing to stop: commits run on the handlers' own threads."""
