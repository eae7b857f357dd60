"""Group commit helper: take what is queued as one batch, honouring a ``None`` stop sentinel."""

from __future__ import annotations

import queue
from typing import TypeVar

T = TypeVar("T")


def take_batch(items: queue.Queue[T | None] | queue.SimpleQueue[T | None], limit: int) -> list[T] | None:
    """Block for one item, then take whatever else is already queued, up to ``limit``.

    Returns None when the sentinel is the first item; a sentinel met later is put back so the next call
    ends the consumer after this batch is processed.
    """
    first = items.get()
    if first is None:
        return None
    batch = [first]
    while len(batch) < limit:
        try:
            nxt = items.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            items.put(None)
            break
        batch.append(nxt)
    return batch
