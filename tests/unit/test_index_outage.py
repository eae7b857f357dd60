"""Indexing through a database outage: a COMMIT whose answer is lost, a database that stays away for a
while. Acknowledged DICOM instances keep their bodies and end up indexed without a restart; an HL7
message committed by a failed try is still mapped."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from msgate.errors import Transient
from msgate.hl7 import indexer as hl7_indexer
from msgate.hl7.msh import read_msh
from msgate.listener import dataset, indexproc
from msgate.storage.ingest import Received
from msgate.storage.models import Hl7Message, Instance
from msgate.storage.store import Store, open_store
from tests.conftest import make_settings
from tests.integration.pacs_peers import encode, flair_series


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = open_store(make_settings(tmp_path / "home", "sqlite"))
    yield st
    st.close()


class Outage:
    """Wraps ``store.db.session``: the first transaction commits but raises as if its answer were lost,
    then every session fails for ``seconds`` (the database still away), then all is normal again."""

    def __init__(self, store: Store, seconds: float) -> None:
        self.real, self.seconds = store.db.session, seconds
        self.away_until: float | None = None
        self.refused = 0
        store.db.session = self.session  # type: ignore[method-assign]

    @contextmanager
    def session(self) -> Iterator[Session]:
        if self.away_until is None:
            self.away_until = 0.0
            with self.real() as session:
                yield session
            self.away_until = time.monotonic() + self.seconds
            raise Transient("database unavailable (OperationalError)", code="db_unavailable")
        if time.monotonic() < self.away_until:
            self.refused += 1
            raise Transient("database unavailable (OperationalError)", code="db_unavailable")
        with self.real() as session:
            yield session


def test_acknowledged_instances_keep_their_bodies_and_are_indexed_through_an_outage(store: Store) -> None:
    """The index COMMIT reached the server but its answer did not, and the database stayed away: the
    bodies were deleted (the check whether their rows exist failed) while the rows stayed, and after
    eight tries the instances were given up until a restart."""
    sources = [encode(ds) for ds in flair_series(n=4, seed=11)]
    batch = [(seq, Received(data, dataset.parse(data), "SCU", "assoc-1")) for seq, data in enumerate(sources, 1)]
    worker = indexproc.Worker(store, conn=None)  # type: ignore[arg-type]
    prepared = worker.prepare(batch)  # type: ignore[arg-type]
    outage = Outage(store, seconds=1.5)
    answers = worker.index(batch, prepared)  # type: ignore[arg-type]
    assert outage.refused > 0  # the database was really away for a while
    assert [a[1] for a in answers] == [1, 1, 1, 1]
    with outage.real() as session:
        rows = session.exec(select(Instance)).all()
        assert len(rows) == 4
        bodies = sorted(store.blobs.read(session, row.blob_id) for row in rows)
    assert bodies == sorted(sources)


def _hl7(i: int) -> bytes:
    return (f"MSH|^~\\&|LAB|HOSP|MSGATE|MSGATE|20250101120000||ORU^R01^ORU_R01|OUT{i:04d}|P|2.5.1\r"
            f"PID|1||M{i}^^^HOSP^MR||DOE^JANE||19800101|F\r"
            f"OBR|1|P{i}|F{i}|1234-5^Test^LN|||20250101110000\r"
            f"OBX|1|NM|101281-4^NfL^LN||12.5|pg/mL|||||F|||20250101100000\r").encode()


def test_an_hl7_message_committed_by_a_failed_try_is_still_mapped(store: Store) -> None:
    """The retry found the rows as duplicates and skipped mapping: they stayed pending until a restart,
    so the case ran without those EHR values."""
    sent: list[dict[str, Any]] = []
    mapper = hl7_indexer.Mapper(store, sent.append)
    idx = hl7_indexer.Indexer(store, store.settings.home, sent.append, mapper)
    idx.tails["0" * 32 + ".jnl"] = hl7_indexer.Tail(reader=None)  # type: ignore[arg-type]  # live, not recovering
    real = store.ingest.store_hl7_batch
    calls = []

    def lost_answer(items: Any, **kwargs: Any) -> Any:
        calls.append(len(items))
        result = real(items, **kwargs)
        if len(calls) == 1:
            raise Transient("database unavailable (OperationalError)", code="db_unavailable")
        return result

    store.ingest.store_hl7_batch = lost_answer  # type: ignore[method-assign]
    records = [(1, _hl7(1)), (2, _hl7(2))]
    assert all(read_msh(raw) for _, raw in records)
    assert idx._process("0" * 32 + ".jnl", records) == 2
    assert len(calls) == 2
    queued = []
    while not mapper.items.empty():
        job = mapper.items.get()
        assert job is not None
        queued.append(job.message_id)
    with store.db.session() as session:
        ids = sorted(i for i in session.exec(select(Hl7Message.id)).all() if i is not None)
    assert sorted(queued) == ids and len(ids) == 2


def test_an_orphaned_indexer_exits_instead_of_retrying_forever(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The indexer ignores stop signals (its listener ends it in order), so one whose listener died during
    a database outage would have retried for ever, holding its batch, deaf to SIGTERM: it now exits at
    its next retry (the listener's journal keeps the batch for the next start)."""
    sources = [encode(ds) for ds in flair_series(n=2, seed=12)]
    batch = [(seq, Received(data, dataset.parse(data), "SCU", "assoc-2")) for seq, data in enumerate(sources, 1)]
    worker = indexproc.Worker(store, conn=None)  # type: ignore[arg-type]
    prepared = worker.prepare(batch)  # type: ignore[arg-type]
    Outage(store, seconds=3600)  # the database stays away

    class Exited(Exception):
        pass

    def exit_(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(indexproc.os, "getppid", lambda: 1)  # reparented: the listener is gone
    monkeypatch.setattr(indexproc.os, "_exit", exit_)
    with pytest.raises(Exited):
        worker.index(batch, prepared)  # type: ignore[arg-type]
