"""Persist-then-acknowledge for C-STORE: each instance is journaled, encrypted and fsynced, before 0x0000.

A received instance is one record of the DICOM commit journal (:mod:`msgate.storage.journal`, its own
folder ``MSGATE_HOME/dicom-journal``): the bytes as received plus the calling AE title and association
id, encrypted under the segment's data key. Concurrent associations share one ``fdatasync``
(:class:`~msgate.listener.committer.LeaderBatcher`). Only then does the handler answer success; the
:class:`~msgate.listener.indexer.Indexer` (a child process) moves journaled instances into the blob
store and the index right behind, and a segment is deleted once every instance in it is stored and
indexed. After a crash the leftover segments are indexed before the port opens, so an acknowledged
instance is never lost. The journal is the write-ahead log of the ingest path, as it is for the HL7 feed.
"""

from __future__ import annotations

from msgate.errors import Transient
from msgate.listener.committer import LeaderBatcher
from msgate.listener.indexer import Indexer
from msgate.listener.record import encode_record
from msgate.storage.ingest import Received
from msgate.storage.journal import Journal


class Intake:
    """``accept`` returns once the instance is durable; it raises Transient when it cannot be made so."""

    def __init__(self, journal: Journal, indexer: Indexer, *, wait_for_room: float = 30.0) -> None:
        self.journal, self.indexer, self.wait_for_room = journal, indexer, wait_for_room
        self._batcher: LeaderBatcher[Received, None] = LeaderBatcher(self._append)

    def accept(self, item: Received) -> None:
        if not self.indexer.reserve(len(item.data), timeout=self.wait_for_room):
            raise Transient("indexing backlog is full", code="index_backlog")
        try:
            self._batcher.submit(item)
        except BaseException:
            self.indexer.release(len(item.data))
            raise

    def _append(self, batch: list[Received]) -> list[None | BaseException]:
        raws = [encode_record(item) for item in batch]
        try:
            segment = self.journal.append(raws)
        except OSError as exc:
            return [Transient(f"journal write failed ({type(exc).__name__})", code="journal_io")] * len(batch)
        self.indexer.put_instances(segment, batch, raws)
        return [None] * len(batch)
