"""A study re-sent in another transfer syntax runs once; re-sent with a pixel changed, it runs again.

A real listener (``msgate serve --role dicom``, its indexer process) on the embedded SQLite setup and on the
machine's PostgreSQL (row bodies), DCMTK ``storescu`` as the PACS, and the scheduler planning in this process
(the test-double model). The first send is explicit VR little endian; the re-sends are RLE (pydicom's
encoder) and JPEG-LS lossless (pyjpegls), the same SOP Instance UIDs: each becomes a new version, which the
indexer decides is only another encoding before the study is ready again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dicom_helpers import running_listener, storescu, write_series
from pydicom import dcmread
from pydicom.uid import JPEGLSLossless, RLELossless
from sqlmodel import col, select

from msgate.config import load_settings
from msgate.storage import keyring
from msgate.storage.models import AuditEvent, Instance, Job, Series, Study
from msgate.storage.store import Store, open_store
from msgate.workers.celery_app import build_app
from msgate.workers.scheduler import Scheduler, plan

pytestmark = [pytest.mark.integration, pytest.mark.peer]

WORKERS = {"model_module": "test_workers_double", "ehr_deadline_seconds": 0, "required_ehr_fields": []}
SLICES = 6


def _reencoded(files: list[Path], folder: Path, syntax: str, *, change: int | None = None) -> list[Path]:
    """The same instances in ``syntax`` (SOP Instance UIDs kept); one pixel changed in slice ``change``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n, path in enumerate(files):
        ds = dcmread(path)
        if n == change:
            pixels = ds.pixel_array.copy()
            pixels[3, 4] = (int(pixels[3, 4]) + 1) % 4000
            ds.PixelData = pixels.tobytes()
        ds.compress(syntax, generate_instance_uid=False)
        target = folder / path.name
        ds.save_as(target, enforce_file_format=True)
        assert str(dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
        out.append(target)
    return out


@contextmanager
def _scheduler_store(home: Path, pg: str | None) -> Iterator[Store]:
    extra = {"database_url": pg, "storage": {"min_free_bytes": 0, "blob_backend": "postgres"}} if pg else \
        {"storage": {"min_free_bytes": 0}}
    store = open_store(load_settings(home=home, workers=WORKERS, **extra), migrate=False, create_keys=False)
    try:
        yield store
    finally:
        store.close()


def _wait_run(store: Store, run: int, log: object, timeout: float = 30.0) -> Study:
    """The study ready for the ``run``-th time (on the storescu release), with every instance indexed."""
    deadline = time.monotonic() + timeout
    while True:
        with store.db.session() as session:
            studies = session.exec(select(Study)).all()
            if len(studies) == 1 and studies[0].state == "ready" and studies[0].runs == run:
                return studies[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run} not ready: {[(s.state, s.runs) for s in studies]}\n{log()[-4000:]}")  # type: ignore[operator]
        time.sleep(0.05)


def _jobs(store: Store) -> list[Job]:
    with store.db.session() as session:
        return list(session.exec(select(Job).order_by(col(Job.created_at))).all())


def _key(store: Store, study_id: int, version: str) -> str:
    with store.db.session() as session:
        study = session.get(Study, study_id)
        assert study is not None
        planned = plan(session, store, study, model_version=version)
        assert planned is not None
        return planned.idem_key


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_study_re_sent_compressed_runs_once_and_a_changed_pixel_runs_again(tmp_path: Path, backend: str,
                                                                           request: pytest.FixtureRequest) -> None:
    files = write_series(tmp_path / "v1", count=SLICES, description="t2_tirm_tra_dark-fluid", size=64)
    rle = _reencoded(files, tmp_path / "rle", RLELossless)
    jls = _reencoded(files, tmp_path / "jls", JPEGLSLossless)
    changed = _reencoded(files, tmp_path / "changed", RLELossless, change=2)
    pg = request.getfixturevalue("pg_url") if backend == "postgres" else None
    env = {"MSGATE_DICOM__QUIET_SECONDS": "30"}  # ready on each release, never by the quiet period here
    if pg:
        keyring.init(tmp_path / "home" / "keys" / "keyring.json")
        env |= {"MSGATE_DATABASE_URL": pg, "MSGATE_STORAGE__BLOB_BACKEND": "postgres"}
    with running_listener(tmp_path, **env) as listener, _scheduler_store(listener.home, pg) as store:
        sched = Scheduler(store, build_app(store.settings))
        assert storescu(listener.port, files).returncode == 0
        study = _wait_run(store, 1, listener.log)
        [first] = sched.scan()
        assert study.id is not None and sched.model_version is not None
        key = _key(store, study.id, sched.model_version)

        for run, resend, propose in ((2, rle, "-xr"), (3, jls, "-xt")):  # the same study compressed: no 2nd job
            sent = storescu(listener.port, resend, propose)
            assert sent.returncode == 0, sent.stderr
            _wait_run(store, run, listener.log)
            assert sched.scan() == [], listener.log()[-4000:]
            assert _key(store, study.id, sched.model_version) == key
        assert [j.id for j in _jobs(store)] == [first]

        with store.db.session() as session:
            rows = session.exec(select(Instance).order_by(col(Instance.version))).all()
            first_hashes = {r.content_hash for r in rows if r.version == 1}
            assert sorted(r.version for r in rows) == sorted([1, 2, 3] * SLICES)
            assert {r.transfer_syntax for r in rows if r.version > 1} == {RLELossless, JPEGLSLossless}
            assert {r.change_hash for r in rows if r.version > 1} == first_hashes  # decided by the indexer
            events = session.exec(select(AuditEvent).where(AuditEvent.kind == "instance.reencoded")).all()
            assert len(events) == 2 * SLICES and {e.actor for e in events} == {"indexer"}

        sent = storescu(listener.port, changed, "-xr")  # one pixel of one slice changed: a real change
        assert sent.returncode == 0, sent.stderr
        _wait_run(store, 4, listener.log)
        [second] = sched.scan()
        assert _key(store, study.id, sched.model_version) != key
        jobs = {j.id: j for j in _jobs(store)}
        assert (jobs[first].state, jobs[second].supersedes_id) == ("superseded", first)
        with store.db.session() as session:
            changes = session.exec(select(AuditEvent).where(AuditEvent.kind == "instance.changed")).all()
            assert [e.detail["reason"] for e in changes] == ["pixels"]
            series = session.exec(select(Series)).one()
            assert series.instance_count == SLICES  # versions are not new instances
