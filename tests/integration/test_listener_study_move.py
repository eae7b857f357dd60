"""A study the PACS merged or split: the same Series and SOP Instance UIDs re-sent under a new Study Instance
UID (and accession) move their series to the new study, which becomes ready and gets its job.

A real listener (``msgate serve --role dicom``, its indexer process) on the embedded SQLite setup and on the
machine's PostgreSQL (row bodies), DCMTK ``storescu`` as the PACS, and the scheduler planning in this process
(the test-double model). Before, each re-sent instance became a new version filed under the old study's
series: the new study had no series and 0 instances, ended ``stable`` (FLAIR missing) and never ran.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dicom_helpers import running_listener, storescu, write_series
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlmodel import col, select

from msgate.config import load_settings
from msgate.storage import keyring
from msgate.storage.models import AuditEvent, Instance, Job, Series, Study
from msgate.storage.store import Store, open_store
from msgate.workers.celery_app import build_app
from msgate.workers.scheduler import Scheduler

pytestmark = [pytest.mark.integration, pytest.mark.peer]

WORKERS = {"model_module": "test_workers_double", "ehr_deadline_seconds": 0, "required_ehr_fields": []}
FLAIR_SLICES, T1_SLICES = 5, 3


def _restudied(files: list[Path], folder: Path, study_uid: str, accession: str) -> list[Path]:
    """The same files with only the Study Instance UID and the accession number changed (a PACS merge)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in files:
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.AccessionNumber = study_uid, accession
        ds.save_as(folder / path.name, enforce_file_format=True)
        out.append(folder / path.name)
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


def _wait(store: Store, what: str, done: Callable[[dict[int, Study]], bool], log: Callable[[], str],
          timeout: float = 40.0) -> dict[int, Study]:
    deadline = time.monotonic() + timeout
    while True:
        with store.db.session() as session:
            studies = {s.id: s for s in session.exec(select(Study)).all() if s.id is not None}
        if done(studies):
            return studies
        if time.monotonic() > deadline:
            got = {sid: (s.state, s.runs, s.instance_count) for sid, s in studies.items()}
            raise AssertionError(f"{what}: {got}\n{log()[-4000:]}")
        time.sleep(0.05)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_study_merged_at_the_pacs_moves_its_series_and_runs(tmp_path: Path, backend: str,
                                                             request: pytest.FixtureRequest) -> None:
    study_a, study_b = generate_uid(), generate_uid()
    files = write_series(tmp_path / "a", count=FLAIR_SLICES, description="t2_tirm_tra_dark-fluid", study_uid=study_a)
    files += write_series(tmp_path / "a", count=T1_SLICES, description="T1 MPRAGE", study_uid=study_a, number=2,
                          scanning=("GR", "IR"), inversion_time=900.0)
    merged = _restudied(files, tmp_path / "b", study_b, "ACC-SYN-2")
    pg = request.getfixturevalue("pg_url") if backend == "postgres" else None
    env = {"MSGATE_DICOM__QUIET_SECONDS": "3"}  # ready on release; the study left without a FLAIR: stable
    if pg:
        keyring.init(tmp_path / "home" / "keys" / "keyring.json")
        env |= {"MSGATE_DATABASE_URL": pg, "MSGATE_STORAGE__BLOB_BACKEND": "postgres"}
    with running_listener(tmp_path, **env) as listener, _scheduler_store(listener.home, pg) as store:
        index = store.cipher.blind_index
        sched = Scheduler(store, build_app(store.settings))
        sent = storescu(listener.port, files)
        assert sent.returncode == 0, sent.stderr
        first = _wait(store, "study A not ready", lambda s: [(x.state, x.runs) for x in s.values()] == [("ready", 1)],
                      listener.log)
        [a_id] = first
        assert first[a_id].study_uid_index == index(study_a, scope="study")
        assert first[a_id].instance_count == FLAIR_SLICES + T1_SLICES
        [job_a] = sched.scan()

        sent = storescu(listener.port, merged)  # the PACS merged the exam into another study and forwards it
        assert sent.returncode == 0, sent.stderr
        studies = _wait(store, "study B not ready, or study A not decided again",
                        lambda s: len(s) == 2 and s[a_id].state == "stable"
                        and [(x.state, x.runs) for sid, x in s.items() if sid != a_id] == [("ready", 1)],
                        listener.log)
        [b_id] = [sid for sid in studies if sid != a_id]
        assert studies[b_id].study_uid_index == index(study_b, scope="study")
        assert studies[b_id].accession_index == index("ACC-SYN-2", scope="accession")
        assert (studies[a_id].instance_count, studies[b_id].instance_count) == (0, FLAIR_SLICES + T1_SLICES)
        assert studies[a_id].runs == 1  # its run stays recorded

        [job_b] = sched.scan()  # the merged study gets its job; the one it left gets none
        assert sched.scan() == []
        with store.db.session() as session:
            series = {s.role: s for s in session.exec(select(Series)).all()}
            assert set(series) == {"FLAIR", "T1"}
            assert {s.study_id for s in series.values()} == {b_id}
            assert [(series[r].instance_count, series[r].frame_count) for r in ("FLAIR", "T1")] == \
                [(FLAIR_SLICES, FLAIR_SLICES), (T1_SLICES, T1_SLICES)]
            rows = session.exec(select(Instance)).all()
            assert sorted(r.version for r in rows) == [1] * len(files) + [2] * len(files)
            assert {r.study_id for r in rows} == {b_id}  # earlier versions follow their series
            assert {r.study_id for r in rows if r.current} == {b_id}
            jobs = {j.id: j for j in session.exec(select(Job)).all()}
            assert (jobs[job_a].study_id, jobs[job_b].study_id) == (a_id, b_id)
            assert jobs[job_b].flags["series"]["FLAIR"] == series["FLAIR"].id
            moved = session.exec(select(AuditEvent).where(AuditEvent.kind == "series.moved")
                                 .order_by(col(AuditEvent.seq))).all()
            assert sorted(e.subject for e in moved) == sorted(f"series:{s.id}" for s in series.values())
            for event in moved:  # internal ids only
                assert event.detail["from_study_id"] == a_id and event.detail["to_study_id"] == b_id
                assert set(event.detail) == {"from_study_id", "to_study_id", "instances", "frames"}
            assert sorted(e.detail["instances"] for e in moved) == [T1_SLICES, FLAIR_SLICES]
            decided = [(e.subject, e.kind) for e in session.exec(select(AuditEvent).where(
                col(AuditEvent.kind).in_(["study.ready", "study.stable", "study.reopened"]))
                .order_by(col(AuditEvent.seq))).all()]
            assert decided[0] == (f"study:{a_id}", "study.ready")
            assert (f"study:{a_id}", "study.reopened") in decided and decided[-1] in {
                (f"study:{a_id}", "study.stable"), (f"study:{b_id}", "study.ready")}
            stable = session.exec(select(AuditEvent).where(AuditEvent.kind == "study.stable")).one()
            assert stable.subject == f"study:{a_id}" and stable.detail["missing"] == ["FLAIR"]
