"""The listener in-process on both storage setups (SQLite + file bodies with group commit, PostgreSQL
with row bodies and per-instance commits): the scheduler hook sees each ready study once per run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dicom_helpers import free_port, pynd_send, write_series
from sqlmodel import select

from msgate.listener import dataset, server
from msgate.listener.tracking import ReadyStudy, Tracker
from msgate.results.dicom_send import c_store
from msgate.storage.models import Instance, Study
from msgate.storage.store import Store

pytestmark = [pytest.mark.integration]


@contextmanager
def _listening(store: Store, *, quiet: float, hook: Callable[[ReadyStudy], None]) -> Iterator[int]:
    """The listener in this process with its tracker thread and ``hook``; yields its port."""
    store.settings.dicom.port = free_port()
    store.settings.dicom.quiet_seconds = quiet
    ae, srv, tracker = server.start(store)
    tracker.add_hook(hook)
    stop = threading.Event()
    thread = threading.Thread(target=tracker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield srv.server_address[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        ae.shutdown()


def _run_until_seen(tracker: Tracker, seen: list[ReadyStudy], *, settle: float = 0.0) -> None:
    """Run the tracker's thread until the hook saw a study (at most 10 s), then ``settle`` seconds more."""
    stop = threading.Event()
    thread = threading.Thread(target=tracker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(settle)
    finally:
        stop.set()
        thread.join(timeout=5)


def test_ready_hook_called_after_commit(store: Store, tmp_path: Path) -> None:
    seen: list[tuple[ReadyStudy, str]] = []

    def hook(ready: ReadyStudy) -> None:
        with store.db.session() as session:
            study = session.get(Study, ready.study_id)
            seen.append((ready, study.state if study else "?"))

    with _listening(store, quiet=30, hook=hook) as port:
        files = write_series(tmp_path / "s", count=4, description="AX FLAIR")
        assert pynd_send(port, files) == [0, 0, 0, 0]
        released = time.monotonic()
        while not seen and time.monotonic() - released < 15:
            time.sleep(0.01)
        assert seen and time.monotonic() - released < 10  # on release, not after the 30 s quiet period
        ready, state = seen[0]
        assert (ready.run, ready.reason, ready.roles, state) == (1, "released", ("FLAIR",), "ready")
        assert pynd_send(port, files[:1]) == [0]  # duplicate: success, not stored twice
        with store.db.session() as session:
            assert len(session.exec(select(Instance)).all()) == 4
        time.sleep(0.3)
        with store.db.session() as session:
            assert [s.state for s in session.exec(select(Study)).all()] == ["ready"]
        assert len(seen) == 1


def test_an_instance_indexed_after_its_association_ended_does_not_hold_the_study(store: Store,
                                                                                  tmp_path: Path) -> None:
    """An instance whose indexing was retried may be answered after its association's end: the study
    must still finish at the quiet period (it used to be reopened and re-finished every 0.25 s)."""
    store.settings.dicom.quiet_seconds = 0.3
    files = write_series(tmp_path / "s", count=2, description="AX FLAIR")
    first = store.ingest.store_instance(source=files[0], assoc_id="a1")
    late = store.ingest.store_instance(source=files[1], assoc_id="a1")
    tracker = Tracker(store, quiet_seconds=0.3, rules=store.settings.rules)
    seen: list[ReadyStudy] = []
    tracker.add_hook(seen.append)
    header = dataset.parse(files[0].read_bytes())
    tracker.instance_stored(first, header, assoc_id="a1", calling_aet="X")
    tracker.association_ended("a1", released=True)
    tracker.instance_stored(late, header, assoc_id="a1", calling_aet="X")  # the retried one, answered late
    _run_until_seen(tracker, seen, settle=1.0)  # several quiet periods: finished once, not again and again
    assert [(r.study_id, r.run) for r in seen] == [(first.study_id, 1)]
    with store.db.session() as session:
        assert [s.state for s in session.exec(select(Study)).all()] == ["ready"]


def test_instances_before_established_event_belong_to_the_association(store: Store, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The data phase runs on the DUL thread and can store instances before the reactor thread has run
    EVT_ESTABLISHED (seen on a loaded box). Both must count them in one association: the handler used
    to start a second one, the first never ended, and the study flipped between stable and receiving."""
    from msgate.listener import handlers
    from msgate.storage.models import Association

    established = handlers.Listener.on_established

    def late(self: handlers.Listener, event: object) -> None:
        time.sleep(0.5)  # the sender's instances arrive meanwhile
        established(self, event)  # type: ignore[arg-type]

    monkeypatch.setattr(handlers.Listener, "on_established", late)
    seen: list[ReadyStudy] = []
    with _listening(store, quiet=30, hook=seen.append) as port:
        files = write_series(tmp_path / "s", count=4, description="AX FLAIR")
        assert pynd_send(port, files) == [0, 0, 0, 0]
        released = time.monotonic()
        while not seen and time.monotonic() - released < 10:
            time.sleep(0.01)
        assert [(r.run, r.reason) for r in seen] == [(1, "released")]  # on release, not the quiet period
        time.sleep(0.5)
        with store.db.session() as session:
            assocs = session.exec(select(Association)).all()
            assert [(a.outcome, a.instances) for a in assocs] == [("released", 4)]
            assert {i.assoc_id for i in session.exec(select(Instance)).all()} == {assocs[0].id}
            assert [s.state for s in session.exec(select(Study)).all()] == ["ready"]


def test_an_association_held_open_after_its_instances_gets_one_run(store: Store, tmp_path: Path) -> None:
    """Routers often keep an association open after the study. At the quiet period the study is ready
    once: it used to be reopened at once (its association was still open) and made ready again, a new
    run and a new scheduler call every 0.25 s, until the association ended."""
    from pynetdicom import AE
    from pynetdicom.presentation import build_context

    seen: list[ReadyStudy] = []
    files = write_series(tmp_path / "s", count=3, description="AX FLAIR")
    first = dataset.parse(files[0].read_bytes())
    scu = AE(ae_title="ROUTER")
    scu.requested_contexts = [build_context(first.get("SOPClassUID"), first.transfer_syntax)]
    # 2 s: long enough that the instances of a loaded box's indexer (PostgreSQL, one commit per instance)
    # are not split into two runs by a gap between them; the old bug re-ran every 0.25 s however long it was
    with _listening(store, quiet=2.0, hook=seen.append) as port:
        assoc = scu.associate("127.0.0.1", port, ae_title="MSGATE")
        try:
            assert assoc.is_established
            assert [int(c_store(assoc, f).Status) for f in files] == [0, 0, 0]
            time.sleep(6.5)  # three quiet periods with the association open and idle
            assert [(r.run, r.reason) for r in seen] == [(1, "quiet")]
            with store.db.session() as session:
                assert [(s.state, s.runs) for s in session.exec(select(Study)).all()] == [("ready", 1)]
            assoc.release()
            time.sleep(0.5)
            assert len(seen) == 1  # the late release does not make it ready again
        finally:
            if assoc.is_established:
                assoc.abort()


def test_a_study_whose_role_was_not_recorded_still_finishes(store: Store, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Recording the series role after indexing can fail (database unavailable for a moment); the study
    must still be tracked, and the decision classifies the series from its row. It used to be dropped
    from tracking and stay ``receiving`` until the listener restarted."""
    from msgate.listener import tracking

    def down(*_: object, **__: object) -> None:
        raise OSError("database unavailable")

    files = write_series(tmp_path / "s", count=2, description="AX FLAIR")
    stored = [store.ingest.store_instance(source=f, assoc_id="a1") for f in files]
    tracker = Tracker(store, quiet_seconds=30, rules=store.settings.rules)
    seen: list[ReadyStudy] = []
    tracker.add_hook(seen.append)
    header = dataset.parse(files[0].read_bytes())
    with monkeypatch.context() as patched:
        patched.setattr(tracking.repo_studies, "set_series_role", down)
        for item in stored:
            tracker.instance_stored(item, header, assoc_id="a1", calling_aet="X")
    tracker.association_ended("a1", released=True)
    _run_until_seen(tracker, seen)
    assert [(r.run, r.reason, r.roles) for r in seen] == [(1, "released", ("FLAIR",))]


def test_a_study_cut_by_an_aborted_association_waits_longer_than_one_quiet_period(store: Store,
                                                                                   tmp_path: Path) -> None:
    """A sender that aborts (crashes, a network cut) left its series half sent and retries; after one quiet
    period the half FLAIR was ready and ran, and the retry then sent a correction. An abort now waits
    ABORTED_QUIET_FACTOR quiet periods; the retry's first instance ends that wait."""
    from pynetdicom import AE
    from pynetdicom.presentation import build_context

    seen: list[ReadyStudy] = []
    files = write_series(tmp_path / "s", count=4, description="AX FLAIR")
    first = dataset.parse(files[0].read_bytes())
    scu = AE(ae_title="ROUTER")
    scu.requested_contexts = [build_context(first.get("SOPClassUID"), first.transfer_syntax)]
    quiet = 0.5
    with _listening(store, quiet=quiet, hook=seen.append) as port:
        assoc = scu.associate("127.0.0.1", port, ae_title="MSGATE")
        assert assoc.is_established
        assert [int(c_store(assoc, f).Status) for f in files[:2]] == [0, 0]
        assoc.abort()  # half sent
        time.sleep(quiet * 3)
        assert seen == []  # not after one quiet period (nor three)
        assert pynd_send(port, files) == [0, 0, 0, 0]  # the sender's retry, released
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [(r.run, r.reason) for r in seen] == [(1, "released")]
