"""HE mode through a real worker process (``msgate serve --role worker``, embedded broker) and the real
key service: the worker never reads or decrypts the EHR, and its result equals the plaintext model's.

The worker runs with spies on every EHR reader (``ehr_spy``: the field cipher for EHR columns, the EHR
link and snapshot, the key service's input builder and the CKKS secret key). One touch fails the job
and leaves a line in the spy file. The key service runs in this (trusted) process, with the store.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import ehr_spy
import numpy as np
import pytest
import test_workers_double as double
from conftest import make_settings
from sqlmodel import select
from test_workers_queue import FAST, Rig, settings_env

from msgate.storage.models import AuditEvent
from msgate.storage.store import open_store
from msgate.workers.celery_app import build_app
from msgate.workers.results_io import read_result
from msgate.workers.scheduler import Scheduler

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _events(rig: Rig, job_id: str) -> list[AuditEvent]:
    with rig.store.db.session() as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.subject == f"job:{job_id}")).all())


def test_he_worker_never_reads_the_ehr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from msgate.model import predict as plain_predict
    from msgate.model.he_service import AUDIT_KIND
    from msgate.model.he_service import run as key_service
    from msgate.workers import case as case_mod

    cfg = {**FAST, "model_module": "msgate.model.predict", "hard_time_limit": 300, "soft_time_limit": 240,
           "visibility_timeout": 400}
    settings = make_settings(tmp_path / "home", "sqlite", workers=cfg, he={"enabled": True})
    store = open_store(settings)
    spy_file = tmp_path / "ehr-touched.txt"
    env = {**settings_env(settings, cfg), "MSGATE_HE__ENABLED": "true", "MSGATE_TEST_EHR_SPY": str(spy_file)}
    rig = Rig(settings, store, env, Scheduler(store, build_app(settings)))
    stop = threading.Event()
    keys_thread = threading.Thread(target=key_service, args=(store, stop), daemon=True)
    try:
        keys_thread.start()
        double.add_patient(store, mrn="MRN00050", nfl=31.0, sex="M", birth="19700101")
        double.make_study(store, seed=50, roles=("FLAIR", "T1"), slices=24, size=64, rle=True, mrn="MRN00050")
        [job_id] = rig.sched.scan()
        log = tmp_path / "worker.log"
        rig.logs.append(log)
        rig.procs.append(subprocess.Popen([sys.executable, "-c", "import ehr_spy; ehr_spy.main()", "serve",
                                           "--role", "worker"], env=env, stdout=log.open("wb"),
                                          stderr=subprocess.STDOUT))
        rig.wait(lambda: spy_file.exists() or rig.settled(1)(), timeout=240, what="the HE job")
        assert not spy_file.exists(), spy_file.read_text()
        [job] = rig.jobs()
        assert job.state == "done", job.error
        result = read_result(store, job_id)
        assert result is not None and "he" in result.flags and result.model_version.endswith("+he")
        assert result.ehr_contributions == {}
        # audit: the key service read the EHR (once, for this job); the worker read only the images
        events = _events(rig, job_id)
        he_reads = [e for e in events if e.kind == AUDIT_KIND]
        worker_reads = [e for e in events if e.kind == "decrypt.inference"]
        assert len(he_reads) == 1 and he_reads[0].detail["ehr"] is True and he_reads[0].actor.startswith("keys@")
        assert worker_reads and all("series_id" in e.detail and "ehr" not in e.detail for e in worker_reads)
        # the same numbers as the plaintext model on the same stored case (EHR read here, the trusted side)
        plain = plain_predict.predict([case_mod.load(store, job_id=job_id, study_id=job.study_id,
                                                     series={k: int(v) for k, v in job.flags["series"].items()},
                                                     actor="test").case], plain_predict.load_model())[0]
        assert np.abs(np.subtract(result.edss_probabilities, plain.edss_probabilities)).max() <= 1e-3
        assert abs(result.p_ms - plain.p_ms) <= 1e-3 and result.edss_class == plain.edss_class
        # the spies do catch the plaintext path: the EHR-reading loader fails under them, the HE one does not
        ehr_spy.install(monkeypatch.setattr)
        args = {"job_id": job_id, "study_id": job.study_id, "actor": "test",
                "series": {k: int(v) for k, v in job.flags["series"].items()}}
        with pytest.raises(ehr_spy.EhrTouched):
            case_mod.load(store, **args)
        assert case_mod.load(store, **args, with_ehr=False).case.ehr is None
    finally:
        stop.set()
        keys_thread.join(timeout=10)
        rig.close()
