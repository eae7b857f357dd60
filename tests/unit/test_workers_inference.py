"""``inference.run`` with a model whose predict raises ``Transient`` (as HE mode does when the key service
does not answer): the batch is released for a retry, never failed. This module is also that model
(``workers.model_module = "test_workers_inference"``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

import test_workers_double as double  # noqa: E402
from conftest import make_settings  # noqa: E402

from msgate.errors import Transient  # noqa: E402
from msgate.model.types import Case, ModelResult  # noqa: E402
from msgate.storage.store import open_store  # noqa: E402
from msgate.workers import inference, jobs, runtime  # noqa: E402
from msgate.workers.celery_app import build_app  # noqa: E402
from msgate.workers.scheduler import Scheduler  # noqa: E402

MODEL_VERSION = "transient-1"
READS_EHR = False
CALLS: list[list[Case]] = []


def load_model() -> None:
    return None


def warm_up() -> None:
    return None


def predict(cases: list[Case]) -> list[ModelResult]:
    CALLS.append(list(cases))
    raise Transient("the HE key service did not answer within 60 s", code="he_timeout")


def test_a_transient_predict_error_releases_the_job(tmp_path: Path) -> None:
    workers = {"model_module": "test_workers_inference", "ehr_deadline_seconds": 0, "required_ehr_fields": [],
               "batch_wait_seconds": 0}
    store = open_store(make_settings(tmp_path / "home", "sqlite", workers=workers))
    try:
        double.make_study(store, seed=61)
        [job_id] = Scheduler(store, build_app(store.settings)).scan()
        rt = runtime.Runtime(store.settings, store)
        with pytest.raises(Transient):
            inference.run(rt, job_id, task_id="t-1", handoff=lambda _: None)
        job = jobs.state_of(store.db, job_id)
        assert job is not None and job.state == "queued" and "transient" in (job.error or "")
        assert len(CALLS) == 1 and CALLS[0][0].case_id == job_id
        assert CALLS[0][0].ehr is None  # READS_EHR = False: the loader left the EHR alone
    finally:
        store.close()


def test_the_process_runtime_follows_the_settings(tmp_path: Path) -> None:
    """A Runtime made for HE settings is not handed to a caller whose settings name the plain model
    (the stale-runtime bug that gave a job the '+he' version while the worker ran the plain model)."""
    plain = make_settings(tmp_path / "home", "sqlite", workers={"model_module": "test_workers_inference"})
    he = make_settings(tmp_path / "home", "sqlite", workers={"model_module": "test_workers_inference"},
                       he={"enabled": True})
    first = runtime.get(he)
    assert runtime.get(he) is first
    second = runtime.get(plain)
    assert second is not first and second.settings.he.enabled is False
    assert runtime.get(plain) is second
    assert runtime.model_version(plain) == MODEL_VERSION
