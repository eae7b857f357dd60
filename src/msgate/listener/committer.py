"""Leader/follower group commit: concurrent callers share one durable write.

The first caller to find no batch running becomes the *leader*: it runs everything queued as one batch
(one journal append and one ``fdatasync`` for the listener), hands each waiting caller its result, and
returns once its own item is done; a waiting caller whose item is still queued then leads the next
batch. Batches form while the previous one runs, no item waits for a timer, and one association alone
commits on its own thread with no hand-off to another thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class _Entry(Generic[T, R]):
    __slots__ = ("item", "result", "done")

    def __init__(self, item: T) -> None:
        self.item = item
        self.result: R | BaseException | None = None
        self.done = False


class LeaderBatcher(Generic[T, R]):
    """``submit(item)`` blocks until ``run`` has processed a batch holding ``item``; returns its result."""

    def __init__(self, run: Callable[[list[T]], list[R | BaseException]], *, max_batch: int = 64) -> None:
        self.run, self.max_batch = run, max_batch
        self._cond = threading.Condition()
        self._queue: list[_Entry[T, R]] = []
        self._leading = False

    def submit(self, item: T) -> R:
        """The result of ``item``'s batch; raises what ``run`` returned (or raised) for it."""
        entry: _Entry[T, R] = _Entry(item)
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
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._leading = False
                    self._cond.notify_all()
        if isinstance(entry.result, BaseException):
            raise entry.result
        return entry.result  # type: ignore[return-value]

    def _run(self, batch: list[_Entry[T, R]]) -> None:
        try:
            results = self.run([e.item for e in batch])
        except BaseException as exc:  # never leave a caller waiting
            log.exception("group commit failed", extra={"batch": len(batch)})
            results = [exc if isinstance(exc, Exception) else RuntimeError("group commit failed")] * len(batch)
        for entry, result in zip(batch, results, strict=True):
            entry.result, entry.done = result, True
