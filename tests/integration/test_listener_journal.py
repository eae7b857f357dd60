"""The DICOM commit journal: what a crash left in it is indexed before the port opens, exactly once."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from dicom_helpers import as_sent, dataset_part, free_port, pynd_send, stored_bytes, write_series
from sqlmodel import select

from msgate.errors import TamperedData
from msgate.listener import dataset, server
from msgate.listener.record import decode_record, encode_record
from msgate.storage.ingest import Received
from msgate.storage.journal import Journal, read_segment
from msgate.storage.models import AuditEvent, Instance
from msgate.storage.store import Store

pytestmark = [pytest.mark.integration]


def _died(journal: Journal) -> None:
    """What the kernel does for a process that dies: its journal folder's lock is released (the segments
    stay, never closed)."""
    import os

    assert journal._owner is not None
    os.close(journal._owner)
    journal._owner = None


def test_leftover_segment_is_indexed_once_before_the_port_opens(store: Store, tmp_path: Path) -> None:
    files = write_series(tmp_path / "s", count=5, description="AX FLAIR")
    datas = [p.read_bytes() for p in files]
    store.ingest.store_instance(source=datas[0], calling_aet="EARLIER")  # indexed before the crash
    journal = Journal(store.settings.home / "dicom-journal", store.ring, preallocate=True)
    records = [encode_record(Received(d, dataset.parse(d), "CRASHED", "assoc1")) for d in datas]
    journal.append(records[:3])
    journal.append(records[3:])
    # the process "died" here: nothing indexed, the segment never closed
    _died(journal)
    journaled = [decode_record(r) for p in journal.directory.glob("*.jnl") for r in read_segment(p, store.ring)]
    assert [d for _, _, d in journaled] == datas and {a for a, _, _ in journaled} == {"CRASHED"}

    store.settings.dicom.port = free_port()
    ae, srv, _ = server.start(store)
    try:
        with store.db.session() as session:
            rows = session.exec(select(Instance)).all()
            ingests = [e for e in session.exec(select(AuditEvent)).all() if e.kind == "ingest.instance"]
        assert len(rows) == 5 and len(ingests) == 5  # the one indexed before is not stored twice
        assert sorted(r.calling_aet for r in rows) == ["CRASHED"] * 4 + ["EARLIER"]
        assert not [p for p in journal.directory.glob("*.jnl") if p.stat().st_size and read_segment(p, store.ring)]
        stored = stored_bytes(store)
        assert sorted(v[0] for v in stored.values()) == sorted(datas)
        assert pynd_send(srv.server_address[1], files[:1]) == [0]  # still serving; a duplicate is success
    finally:
        ae.shutdown()


def test_a_replayed_journal_does_not_revert_a_corrected_instance(store: Store, tmp_path: Path) -> None:
    """v1 then a corrected v2 of one instance (two associations), both indexed; the process dies before
    their segment is deleted, and recovery replays both records. v1 used to differ from the current v2,
    so it was stored again as v3: the corrected instance reverted and a spurious audit event appeared."""
    import pydicom

    first = write_series(tmp_path / "v1", count=1, description="AX FLAIR")[0]
    ds = pydicom.dcmread(first)
    ds.ImageComments = "corrected"
    second = tmp_path / "v2.dcm"
    ds.save_as(second)
    v1, v2 = first.read_bytes(), second.read_bytes()
    store.ingest.store_instance(source=v1, assoc_id="assoc1")
    store.ingest.store_instance(source=v2, assoc_id="assoc2")
    journal = Journal(store.settings.home / "dicom-journal", store.ring, preallocate=True)
    journal.append([encode_record(Received(v1, dataset.parse(v1), "SCU", "assoc1")),
                    encode_record(Received(v2, dataset.parse(v2), "SCU", "assoc2"))])
    _died(journal)
    store.settings.dicom.port = free_port()
    ae, _, _ = server.start(store)
    ae.shutdown()
    with store.db.session() as session:
        rows = session.exec(select(Instance).order_by(Instance.version)).all()  # type: ignore[arg-type]
        ingests = [e for e in session.exec(select(AuditEvent)).all() if e.kind == "ingest.instance"]
    assert [(r.version, r.current, r.assoc_id) for r in rows] == [(1, False, "assoc1"), (2, True, "assoc2")]
    assert len(ingests) == 2
    assert list(stored_bytes(store).values()) == [[v1, v2]]


def test_a_recovered_reencoded_version_keeps_its_identity(store: Store, tmp_path: Path) -> None:
    """A study re-sent RLE-compressed was acknowledged from the journal and the process died before the
    indexer decided the new versions: recovery indexed them undecided, so they counted as changed and the
    study ran again for the same pixels."""
    import pydicom
    from pydicom.uid import RLELossless

    first = write_series(tmp_path / "v1", count=1, description="AX FLAIR")[0]
    ds = pydicom.dcmread(first)
    ds.compress(RLELossless, generate_instance_uid=False)
    second = tmp_path / "rle.dcm"
    ds.save_as(second, enforce_file_format=True)
    v1, v2 = first.read_bytes(), second.read_bytes()
    store.ingest.store_instance(source=v1, assoc_id="assoc1")
    journal = Journal(store.settings.home / "dicom-journal", store.ring, preallocate=True)
    journal.append([encode_record(Received(v2, dataset.parse(v2), "SCU", "assoc2"))])
    _died(journal)
    store.settings.dicom.port = free_port()
    ae, _, _ = server.start(store)
    ae.shutdown()
    with store.db.session() as session:
        rows = session.exec(select(Instance).order_by(Instance.version)).all()  # type: ignore[arg-type]
        kinds = [e.kind for e in session.exec(select(AuditEvent)).all()]
    assert [(r.version, r.current) for r in rows] == [(1, False), (2, True)]
    assert rows[1].content_hash != rows[0].content_hash
    assert rows[1].change_hash == rows[0].content_hash
    assert "instance.reencoded" in kinds


def test_recovered_instances_reopen_a_finished_study(store: Store, tmp_path: Path) -> None:
    """A T1-only study had ended ``stable``; its FLAIR was acknowledged from the journal and the process
    died before indexing it. Recovery indexed the FLAIR but left the study stable: no job ever ran."""
    import pydicom

    from msgate.storage import repo_studies
    from msgate.storage.models import Study

    t1 = write_series(tmp_path / "t1", count=2, description="T1 MPRAGE", scanning=("GR", "IR"),
                      inversion_time=900.0)
    study_uid = str(pydicom.dcmread(t1[0]).StudyInstanceUID)
    flair = write_series(tmp_path / "fl", count=2, description="AX FLAIR", study_uid=study_uid, number=2)
    stored = [store.ingest.store_instance(source=p, assoc_id="a1") for p in t1]
    with store.db.session() as session:
        repo_studies.finish(session, study_id=stored[0].study_id, state="stable", reason="quiet", roles=["T1"],
                            missing=["FLAIR"])
    journal = Journal(store.settings.home / "dicom-journal", store.ring, preallocate=True)
    journal.append([encode_record(Received(p.read_bytes(), dataset.parse(p.read_bytes()), "SCU", "a2"))
                    for p in flair])
    _died(journal)
    store.settings.dicom.port = free_port()
    store.settings.dicom.quiet_seconds = 0.5
    ae, _, tracker = server.start(store)
    tracker.load_open()
    stop = threading.Event()
    thread = threading.Thread(target=tracker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while True:
            with store.db.session() as session:
                study = session.get(Study, stored[0].study_id)
                assert study is not None
                if (study.state, study.runs) == ("ready", 1) or time.monotonic() > deadline:
                    break
            time.sleep(0.1)
        assert (study.state, study.runs, study.instance_count) == ("ready", 1, 4)
    finally:
        stop.set()
        thread.join(5)
        ae.shutdown()


def test_zero_filled_segment_keeps_records_and_drops_a_torn_tail(store: Store, tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", store.ring, rotate_bytes=1 << 20, preallocate=True)
    path = tmp_path / "j" / journal.append([b"first" * 10, b"second" * 10])
    assert path.stat().st_size >= 1 << 20  # zero-filled ahead: appends do not grow the file
    size = sum(4 + 12 + len(r) + 16 for r in (b"first" * 10, b"second" * 10))
    header_end = len(path.read_bytes().rstrip(b"\0")) - size
    with path.open("r+b") as fh:  # a crash inside the write of a third record: its length, half a body
        fh.seek(header_end + size)
        fh.write((100).to_bytes(4, "big") + os.urandom(40))
    assert read_segment(path, store.ring) == [b"first" * 10, b"second" * 10]
    with path.open("r+b") as fh:  # but a record altered in the middle is tampering, not a torn tail
        fh.seek(header_end + 4 + 12 + 3)
        fh.write(b"X")
    with pytest.raises(TamperedData):
        read_segment(path, store.ring)


def _indexer_children() -> list[int]:
    """Pids of this process's DICOM indexer children."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"msgate.listener.indexproc" in cmdline:
            found.append(int(entry.name))
    return found


def test_a_killed_indexer_process_is_restarted_and_nothing_is_lost(store: Store, tmp_path: Path) -> None:
    """SIGKILL the indexer child between two associations and in the middle of a third: every acknowledged
    instance ends up indexed exactly once, and the journal is emptied."""
    files = write_series(tmp_path / "s", count=30, description="AX FLAIR")
    store.settings.dicom.port = free_port()
    ae, srv, _ = server.start(store)
    port = srv.server_address[1]
    try:
        [first] = _indexer_children()
        assert pynd_send(port, files[:10]) == [0] * 10
        os.kill(first, signal.SIGKILL)
        assert pynd_send(port, files[10:20]) == [0] * 10  # acknowledged from the journal meanwhile
        deadline = time.monotonic() + 30
        while not (children := _indexer_children()) or children == [first]:
            assert time.monotonic() < deadline, "indexer not restarted"
            time.sleep(0.1)
        [second] = children
        killer = threading.Timer(0.05, os.kill, (second, signal.SIGKILL))
        killer.start()
        assert pynd_send(port, files[20:]) == [0] * 10
        killer.join()
        with store.db.session() as session:
            rows = session.exec(select(Instance)).all()
            ingests = [e for e in session.exec(select(AuditEvent)).all() if e.kind == "ingest.instance"]
        assert len(rows) == 30 and len(ingests) == 30  # released only once indexed; none stored twice
        stored = sorted(dataset_part(v[0]) for v in stored_bytes(store).values())
        assert stored == sorted(as_sent(p.read_bytes()) for p in files)
    finally:
        ae.shutdown()
    journal = store.settings.home / "dicom-journal"
    assert not [p for p in journal.glob("*.jnl") if read_segment(p, store.ring)]
