"""The live path: a record the indexer process keeps failing to index (not transiently) is quarantined after
its tries and answered as handled, so the listener can delete its journal segment; the others of its batch
are indexed. Before, it was answered "given up": its segment stayed for good and the next start raised."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from msgate.listener import dataset, indexproc, quarantine
from msgate.listener.indexer import Indexer
from msgate.listener.record import encode_record
from msgate.storage.index_dicom import BatchIndexer
from msgate.storage.ingest import Received
from msgate.storage.journal import Journal, read_segment
from msgate.storage.models import AuditEvent, Instance
from msgate.storage.store import Store, open_store
from tests.conftest import make_settings
from tests.dicom_factory import mr_slice

BAD_STUDY = "1.2.826.0.1.3680043.8.498.99999"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = open_store(make_settings(tmp_path / "home", "sqlite"))
    yield st
    st.close()


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    real = BatchIndexer._study

    def study(self: BatchIndexer, header: Any, calling_aet: str) -> tuple[int, bool]:
        if header.get("StudyInstanceUID") == BAD_STUDY:
            raise RuntimeError("an indexing bug")
        return real(self, header, calling_aet)

    monkeypatch.setattr(BatchIndexer, "_study", study)
    monkeypatch.setattr(indexproc, "MAX_TRIES", 2)


def _received(data: bytes) -> Received:
    return Received(data, dataset.parse(data), "SCU", "assoc-live")


@pytest.mark.usefixtures("poisoned")
def test_the_indexer_process_quarantines_what_keeps_failing(store: Store) -> None:
    good, bad = mr_slice(index=0), mr_slice(index=1, study_uid=BAD_STUDY)
    batch: list[Any] = [(1, _received(good)), (2, _received(bad)), (3, None)]
    worker = indexproc.Worker(store, conn=None)  # type: ignore[arg-type]
    answers = worker.index(batch, worker.prepare(batch))
    assert answers[0][:2] == [1, 1] and answers[2] == [3, 2]
    assert answers[1][:2] == [2, 3], answers[1]  # quarantined, with its id
    [entry] = quarantine.entries(store.settings.home)
    assert answers[1][2] == entry.id and entry.reason == "RuntimeError"
    assert read_segment(entry.path, store.ring) == [encode_record(_received(bad))]
    with store.db.session() as session:
        assert len(session.exec(select(Instance)).all()) == 1
        [event] = session.exec(select(AuditEvent).where(AuditEvent.kind == "instance.quarantined")).all()
    assert event.actor == "listener" and event.detail["assoc_id"] == "assoc-live"


def test_a_quarantined_answer_lets_its_journal_segment_go(store: Store) -> None:
    jnl = Journal(store.settings.home / "dicom-journal", store.ring)
    received = _received(mr_slice())
    raw = encode_record(received)
    name = jnl.append([raw])
    idx = Indexer(store, jnl, tracker=None, max_backlog_bytes=1 << 20)  # type: ignore[arg-type]
    assert idx.reserve(len(received.data), timeout=1)
    idx.put_instances(name, [received], [raw])
    idx._answered([[1, 3, "0" * 32]])
    assert idx.wait_indexed("assoc-live", timeout=0) and idx.backlog_bytes == 0
    jnl.close()
    assert not (jnl.directory / name).exists()  # counted as handled: the segment went with the journal's close
