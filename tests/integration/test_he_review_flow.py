"""HE mode end to end in one process (the review's reproducers): a real store, the real key service
(``he_service.run`` on the embedded broker), the real worker inference runner with the HE plug-in and
the shipped tiny checkpoint; and the keys role on a Redis broker that restarts.

- a database blip in the key service, or a lost broker while a batch is in flight, re-queues the jobs
  (they failed for good: the one-by-one retry was refused as a replay), and the next attempt succeeds;
- after a model upgrade (new calibration temperatures) the key service calibrates with the new
  checkpoint: the HE result equals the plaintext model's;
- the keys role survives a Redis restart, and the worker's client sees the outage as Transient.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_workers_double as double
from conftest import make_settings

from msgate.errors import Rejected, Transient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENV = {"MSGATE_HE__ENABLED": "1", "MSGATE_STORAGE__MIN_FREE_BYTES": "0", "MSGATE_STORAGE__PURGE_FREE_BYTES": "0",
       "MSGATE_WORKERS__EHR_DEADLINE_SECONDS": "0", "MSGATE_WORKERS__REQUIRED_EHR_FIELDS": "[]",
       "MSGATE_WORKERS__BATCH_SIZE": "4", "MSGATE_WORKERS__BATCH_WAIT_SECONDS": "0.3",
       "MSGATE_WORKERS__PUBLISH_GRACE_SECONDS": "0"}


@dataclass
class Rig:
    store: Any
    ckpt: Path
    seed: int = 80

    def studies(self, n: int) -> list[str]:
        from msgate.workers.celery_app import build_app
        from msgate.workers.scheduler import Scheduler

        for _ in range(n):
            self.seed += 1
            mrn = f"MRN{self.seed:05d}"
            double.add_patient(self.store, mrn=mrn, nfl=20.0 + self.seed % 7, sex="M", birth="19700101")
            double.make_study(self.store, seed=self.seed, roles=("FLAIR", "T1"), slices=24, size=64, rle=True,
                              mrn=mrn)
        return list(Scheduler(self.store, build_app(self.store.settings)).scan())

    def job(self, job_id: str) -> Any:
        from msgate.workers import jobs

        return jobs.state_of(self.store.db, job_id)

    def run(self, rt: Any, job_id: str) -> str:
        from msgate.workers import inference

        return str(inference.run(rt, job_id, task_id=None, handoff=lambda _: None))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """The key service and worker share MSGATE_HOME (the HE plug-in reads its settings from the
    environment) and a copy of the shipped checkpoint, which the upgrade test replaces."""
    from msgate.model import he_service
    from msgate.model.patient import checkpoint
    from msgate.storage.store import open_store

    home = tmp_path_factory.mktemp("he-review") / "home"
    ckpt = home.parent / "patient.pt"
    shutil.copyfile(checkpoint.DEFAULT_PATH, ckpt)
    shutil.copyfile(checkpoint.DEFAULT_PATH.with_suffix(".json"), ckpt.with_suffix(".json"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**ENV, "MSGATE_HOME": str(home)}.items():
            mp.setenv(k, v)
        mp.setattr(checkpoint, "DEFAULT_PATH", ckpt)
        store = open_store(make_settings(home, "sqlite"))
        stop = threading.Event()
        keys = threading.Thread(target=he_service.run, args=(store, stop), daemon=True)
        keys.start()
        try:
            yield Rig(store, ckpt)
        finally:
            stop.set()
            keys.join(10)
            store.close()


@pytest.fixture(scope="module")
def rt(rig: Rig) -> Any:
    from msgate.workers.runtime import Runtime

    runtime = Runtime(rig.store.settings, rig.store)
    runtime.model()
    return runtime


def test_key_service_database_blip_requeues_the_job(rig: Rig, rt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """'database is locked' while the key service writes its audit record came back as Rejected."""
    import sqlalchemy.exc

    from msgate.model import he_service
    from msgate.storage import audit

    [job_id] = rig.studies(1)
    real, injected = audit.append, []

    def flaky(session: Any, **kw: Any) -> Any:
        if kw.get("kind") == he_service.AUDIT_KIND and not injected:
            injected.append(1)
            raise sqlalchemy.exc.OperationalError("INSERT INTO audit_event", {}, Exception("database is locked"))
        return real(session, **kw)

    monkeypatch.setattr(audit, "append", flaky)
    with pytest.raises(Transient) as got:
        rig.run(rt, job_id)
    assert injected and got.value.code == "db_unavailable"
    job = rig.job(job_id)
    assert job.state == "queued" and "db_unavailable" in job.error, (job.state, job.error)
    assert rig.run(rt, job_id) == "batch of 1"  # the retry (next attempt) gets its inputs
    assert rig.job(job_id).state == "done"


def test_broker_lost_mid_batch_requeues_every_job(rig: Rig, rt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis restarting between encrypt_jobs and finalize: kombu's error failed the batch, and the
    one-by-one retry was refused as a replay, so every job of the batch failed for good."""
    import kombu.exceptions

    from msgate.model import he_rpc

    ids = rig.studies(2)
    real, calls = he_rpc.broker_connection, []

    def connection(settings: Any) -> Any:
        if threading.current_thread() is threading.main_thread():  # the worker's client, not the keys role
            calls.append(1)
            if len(calls) == 2:  # encrypt_jobs went through; finalize finds the broker gone
                raise kombu.exceptions.OperationalError("Error 111 connecting to redis:6379. Connection refused.")
        return real(settings)

    monkeypatch.setattr(he_rpc, "broker_connection", connection)
    with pytest.raises(Transient) as got:
        rig.run(rt, ids[0])
    assert got.value.code == "he_broker"
    for jid in ids:
        job = rig.job(jid)
        assert job.state == "queued" and job.attempts == 1 and "he_broker" in job.error, (job.state, job.error)
    for jid in ids:  # each on its next attempt, alone
        assert rig.run(rt, jid) == "batch of 1"
        assert rig.job(jid).state == "done"


def test_upgrade_with_new_temperatures_is_calibrated_by_the_new_checkpoint(rig: Rig, rt: Any) -> None:
    """The keys role kept the spec it loaded first: after an upgrade the HE results used the old
    temperatures (max |dp| 0.10 measured)."""
    import torch

    from msgate.model import predict as plain_predict
    from msgate.workers import case as case_mod
    from msgate.workers.results_io import read_result
    from msgate.workers.runtime import Runtime

    [before] = rig.studies(1)
    assert rig.run(rt, before) == "batch of 1" and rig.job(before).state == "done"  # the old spec is loaded
    blob = torch.load(rig.ckpt, map_location="cpu", weights_only=True)
    meta = json.loads(blob["meta_json"])
    meta["temperature_edss"], meta["temperature_ms"] = 2.5, 1.75
    blob["meta_json"] = json.dumps(meta, sort_keys=True)
    torch.save(blob, rig.ckpt)  # installed in place; the workers restart
    rt2 = Runtime(rig.store.settings, rig.store)
    rt2.model()
    [after] = rig.studies(1)
    with rig.store.db.session() as session:  # planned for the restarted worker's version
        from msgate.storage.models import Job

        row = session.get(Job, after)
        row.model_version = rt2.version[:64]
        session.add(row)
    assert rig.run(rt2, after) == "batch of 1"
    job = rig.job(after)
    assert job.state == "done", job.error
    got = read_result(rig.store, after)
    series = {k: int(v) for k, v in job.flags["series"].items()}
    case = case_mod.load(rig.store, job_id=after, study_id=job.study_id, series=series, actor="test").case
    plain = plain_predict.predict([case], plain_predict.load_model(rig.ckpt))[0]
    assert np.abs(np.subtract(got.edss_probabilities, plain.edss_probabilities)).max() <= 1e-3
    assert abs(got.p_ms - plain.p_ms) <= 1e-3


def _free_port() -> int:
    """A free port in 45500-45999 (this file's private Redis)."""
    for port in range(45500 + os.getpid() % 400, 46000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 45500-45999")


def _redis(port: int, folder: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"redis-server did not open port {port}")


@pytest.mark.redis
def test_keys_role_survives_a_redis_restart(tmp_path: Path) -> None:
    """A Redis restart ended the keys role's thread (with it every role of its serve process), and the
    worker's client raised kombu's error, neither Transient nor Rejected."""
    from msgate.config import load_settings
    from msgate.model import he_rpc
    from msgate.model.he_keys import HeKeys

    port = _free_port()
    redis = _redis(port, tmp_path)
    settings = load_settings(home=tmp_path / "home", broker_url=f"redis://127.0.0.1:{port}/0", he={"enabled": True})
    stop, ready, died = threading.Event(), threading.Event(), []

    def role() -> None:
        try:
            he_rpc.serve(HeKeys(settings.home), settings, stop, ready=ready)
        except BaseException as exc:  # noqa: BLE001
            died.append(type(exc).__name__)

    thread = threading.Thread(target=role, daemon=True)
    thread.start()
    client = he_rpc.BrokerKeyClient(settings, timeout=15)
    try:
        assert ready.wait(10)
        with pytest.raises(Rejected, match="unknown op"):
            client._call({"op": "ping"})
        redis.terminate()
        redis.wait(10)
        with pytest.raises(Transient) as got:
            client._call({"op": "ping"})
        assert got.value.code == "he_broker"
        time.sleep(1.5)
        assert thread.is_alive() and not died
        redis = _redis(port, tmp_path)
        with pytest.raises(Rejected, match="unknown op"):  # answered again once the keys role reconnected
            client._call({"op": "ping"})
        assert thread.is_alive() and not died
    finally:
        stop.set()
        thread.join(10)
        redis.terminate()
        redis.wait(10)
