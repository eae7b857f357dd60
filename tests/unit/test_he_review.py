"""HE mode failure handling (review of the TenSEAL CKKS mode): transient key-service and broker errors
are retried instead of failing jobs for good, a failed HE batch is re-queued (the key service encrypts a
job's inputs once per attempt), the key service follows a model upgrade, the CKKS parameters carry the
circuit, and the keys role opens its secret before it reports ready and survives a broker restart.

This module is also a worker model (``workers.model_module = "test_he_review"``) that behaves like the
HE plug-in towards the key service: a job's inputs once per attempt, then a batch that fails."""

from __future__ import annotations

import json
import logging
import queue
import shutil
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

import test_workers_double as double  # noqa: E402
from conftest import make_settings  # noqa: E402

from msgate.errors import (  # noqa: E402
    ConfigError,
    DatabaseUnavailable,
    KeyFilePermissions,
    Rejected,
    TamperedData,
    Transient,
)
from msgate.model import he, he_rpc  # noqa: E402
from msgate.model.he_service import JobSource, ModelSpec  # noqa: E402
from msgate.model.types import Case, ModelResult  # noqa: E402

# -- the worker model of this module -----------------------------------------------------------------

MODEL_VERSION = "he-review-1"
READS_EHR = False
STORE: Any = None
ISSUED: dict[str, int] = {}  # job id -> attempt its inputs were "encrypted" for (the key service's rule)
CALLS: list[list[str]] = []


def load_model() -> None:
    return None


def warm_up() -> None:
    return None


def predict(cases: Sequence[Case]) -> list[ModelResult]:
    """The key service's rule (inputs once per attempt), then a batch that fails after encryption."""
    from msgate.workers import jobs

    ids = [c.case_id for c in cases]
    CALLS.append(ids)
    for jid in ids:
        job = jobs.state_of(STORE.db, jid)
        assert job is not None
        if ISSUED.get(jid) == job.attempts:
            raise Rejected(f"job {jid} already had its HE inputs for this attempt", code="he_replay")
        ISSUED[jid] = job.attempts
    if len(cases) > 1:
        raise RuntimeError("encrypted evaluation failed")
    import numpy as np

    return [ModelResult(case_id=c.case_id, model_name="he-review", model_version=MODEL_VERSION,
                        edss_probabilities=(0.25, 0.25, 0.25, 0.25), edss_estimate=2.0, confidence=0.25,
                        uncertainty=0.5, p_ms=0.5, lesions=(), lesion_mask=np.zeros(c.flair.data.shape, np.int16),
                        heatmap=None, ehr_contributions={}, flags=("he",)) for c in cases]


# -- a kombu-like in-memory broker ---------------------------------------------------------------------


class _Msg:
    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload

    def ack(self) -> None:
        pass


class _Queue:
    Empty = queue.Empty

    def __init__(self, conn: _Conn, name: str) -> None:
        self.conn, self.name = conn, name

    def __enter__(self) -> _Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def put(self, payload: dict[str, Any]) -> None:
        self.conn.broker.queues[self.name].put(_Msg(payload))
        if self.name == he_rpc.REQUEST_QUEUE and self.conn.broker.answer is not None:  # the key service
            req = self.conn.broker.queues[self.name].get()
            reply = {"corr": req.payload["corr"], **self.conn.broker.answer(req.payload)}
            self.conn.broker.queues[req.payload["reply_to"]].put(_Msg(reply))

    def get(self, block: bool = True, timeout: float | None = None) -> _Msg:
        if self.conn.fail is not None:
            raise self.conn.fail
        return self.conn.broker.queues[self.name].get(block=block, timeout=timeout)

    def close(self) -> None:
        pass


class _Conn:
    def __init__(self, broker: _Broker, fail: BaseException | None = None) -> None:
        self.broker, self.fail = broker, fail

    def __enter__(self) -> _Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def SimpleQueue(self, name: str) -> _Queue:  # noqa: N802 - kombu's name
        return _Queue(self, name)


class _Broker:
    def __init__(self, answer: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.queues: defaultdict[str, queue.Queue[_Msg]] = defaultdict(queue.Queue)
        self.answer = answer
        self.connections = 0


def _client(monkeypatch: pytest.MonkeyPatch, reply: dict[str, Any]) -> he_rpc.BrokerKeyClient:
    broker = _Broker(lambda req: reply)
    monkeypatch.setattr(he_rpc, "broker_connection", lambda settings: _Conn(broker))
    return he_rpc.BrokerKeyClient(None, timeout=2)


# -- finding 1: transient errors are transient, a failed HE batch is re-queued ---------------------------


@pytest.mark.parametrize(("reply", "kind"), [
    ({"error": "database unavailable (OperationalError)", "code": "db_unavailable", "transient": True}, Transient),
    ({"error": "database unavailable (OperationalError)", "code": "db_unavailable"}, Transient),  # older service
    ({"error": "the checkpoint is being replaced", "code": "he_checkpoint", "transient": True}, Transient),
    ({"error": "HE result ciphertext failed its MAC", "code": "he_result_mac"}, TamperedData),
    ({"error": "job j1 is done, not running: no HE inputs", "code": "he_job_state"}, Rejected),
])
def test_key_service_reply_codes_map_to_the_right_error(monkeypatch: pytest.MonkeyPatch, reply: dict[str, Any],
                                                         kind: type[Exception]) -> None:
    """A key service database blip came back as Rejected: the worker failed the jobs for good."""
    client = _client(monkeypatch, reply)
    with pytest.raises(kind) as got:
        client.encrypt_jobs(["j1"], model="fp")
    assert type(got.value) is kind and got.value.code == reply["code"]  # type: ignore[attr-defined]
    if kind is Transient:
        assert reply["code"] in str(got.value)  # the job's error text names the key service's code


def test_broker_down_is_transient_for_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """kombu's OperationalError (Redis restarting) went through as itself: neither Transient nor Rejected."""
    import kombu.exceptions
    import redis.exceptions

    for exc in (kombu.exceptions.OperationalError("Error 111 connecting to redis:6379. Connection refused."),
                redis.exceptions.ConnectionError("Connection refused")):
        def down(settings: Any, exc: Exception = exc) -> Any:
            raise exc

        monkeypatch.setattr(he_rpc, "broker_connection", down)
        with pytest.raises(Transient) as got:
            he_rpc.BrokerKeyClient(None, timeout=2).encrypt_jobs(["j1"], model="fp")
        assert got.value.code == "he_broker"


class _Jobs:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def encrypt(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc


def test_handle_marks_transient_errors_and_answers_unforeseen_ones() -> None:
    req = {"op": "encrypt_jobs", "job_ids": ["j1"], "model": "fp"}
    reply = he_rpc.handle(None, req, _Jobs(DatabaseUnavailable("cannot connect")))  # type: ignore[arg-type]
    assert reply["code"] == "db_unavailable" and reply["transient"] is True
    reply = he_rpc.handle(None, req, _Jobs(Rejected("no job j1", code="he_no_job")))  # type: ignore[arg-type]
    assert reply["code"] == "he_no_job" and reply["transient"] is False
    # an error nobody foresaw is answered (it ended the serving loop, and with it the keys role)
    reply = he_rpc.handle(None, req, _Jobs(RuntimeError("boom")))  # type: ignore[arg-type]
    assert reply["code"] == "he_internal" and "RuntimeError" in reply["error"]


def test_failed_he_batch_is_requeued_and_each_job_runs_alone(tmp_path: Path) -> None:
    """A non-transient error after the key service encrypted a batch: the one-by-one retry was refused as
    a replay (once per attempt) and every job of the batch failed for good. Now the batch is re-queued
    and each job runs alone on its next attempt, with fresh inputs."""
    global STORE
    from msgate.storage.store import open_store
    from msgate.workers import inference, jobs, runtime
    from msgate.workers.celery_app import build_app
    from msgate.workers.scheduler import Scheduler

    workers = {"model_module": "test_he_review", "ehr_deadline_seconds": 0, "required_ehr_fields": [],
               "batch_wait_seconds": 0, "batch_size": 4}
    STORE = store = open_store(make_settings(tmp_path / "home", "sqlite", workers=workers, he={"enabled": True}))
    ISSUED.clear()
    CALLS.clear()
    try:
        double.make_study(store, seed=71)
        double.make_study(store, seed=72)
        ids = Scheduler(store, build_app(store.settings)).scan()
        assert len(ids) == 2
        rt = runtime.Runtime(store.settings, store)
        with pytest.raises(Transient) as got:
            inference.run(rt, ids[0], task_id="t-1", handoff=lambda _: None)
        assert got.value.code == "he_batch"
        for jid in ids:
            job = jobs.state_of(store.db, jid)
            assert job is not None and job.state == "queued" and job.attempts == 1, (job.state, job.error)
            assert "RuntimeError" in (job.error or ""), job.error  # the cause, in the job's error text
        assert len(CALLS) == 1 and sorted(CALLS[0]) == sorted(ids)  # no one-by-one retry in that attempt
        for jid in ids:  # the next attempt: alone, and the key service gives fresh inputs
            assert inference.run(rt, jid, task_id=f"t-{jid}", handoff=lambda _: None) == "batch of 1"
            job = jobs.state_of(store.db, jid)
            assert job is not None and job.state == "done" and job.attempts == 2
    finally:
        STORE = None
        store.close()


def test_single_he_job_failure_names_the_key_service_code(tmp_path: Path) -> None:
    global STORE
    from msgate.storage.store import open_store
    from msgate.workers import inference, jobs, runtime
    from msgate.workers.celery_app import build_app
    from msgate.workers.scheduler import Scheduler

    workers = {"model_module": "test_he_review", "ehr_deadline_seconds": 0, "required_ehr_fields": [],
               "batch_wait_seconds": 0}
    STORE = store = open_store(make_settings(tmp_path / "home", "sqlite", workers=workers, he={"enabled": True}))
    try:
        double.make_study(store, seed=73)
        [jid] = Scheduler(store, build_app(store.settings)).scan()
        ISSUED.clear()
        ISSUED[jid] = 1  # its inputs were already issued for the attempt this run claims
        rt = runtime.Runtime(store.settings, store)
        inference.run(rt, jid, task_id="t-1", handoff=lambda _: None)
        job = jobs.state_of(store.db, jid)
        assert job is not None and job.state == "failed" and "he_replay" in (job.error or ""), job.error
    finally:
        STORE = None
        store.close()


# -- finding 2: the key service follows a model upgrade ------------------------------------------------


def test_fingerprint_covers_the_calibration_temperatures() -> None:
    base = ModelSpec((0.0, 1.0), (1.0, 2.0), (32, 32))
    assert ModelSpec((0.0, 1.0), (1.0, 2.0), (32, 32), 2.0, 1.0).fingerprint != base.fingerprint
    assert ModelSpec((0.0, 1.0), (1.0, 2.0), (32, 32), 1.0, 0.5).fingerprint != base.fingerprint


def _install(src: Path, dst: Path, **meta_update: Any) -> None:
    import torch

    blob = torch.load(src, map_location="cpu", weights_only=True)
    meta = json.loads(blob["meta_json"])
    meta.update(meta_update)
    blob["meta_json"] = json.dumps(meta, sort_keys=True)
    torch.save(blob, dst)
    shutil.copyfile(src.with_suffix(".json"), dst.with_suffix(".json"))


def test_key_service_reads_the_checkpoint_again_after_an_upgrade(tmp_path: Path) -> None:
    """The keys role loaded the spec once; after an upgrade it calibrated with the old temperatures."""
    from msgate.model.patient import checkpoint

    path = tmp_path / "patient.pt"
    _install(checkpoint.DEFAULT_PATH, path)
    source = JobSource(None, checkpoint=path)  # type: ignore[arg-type]
    old = source.spec()
    _install(checkpoint.DEFAULT_PATH, path, temperature_edss=2.5, temperature_ms=1.75)
    new = source.spec()
    assert (new.t_edss, new.t_ms) == (2.5, 1.75) and new.fingerprint != old.fingerprint
    assert source.spec_of(new.fingerprint) is new
    assert source.spec_of(old.fingerprint) is old  # a worker not restarted yet keeps its own calibration
    with pytest.raises(Rejected) as got:
        source.spec_of("another-checkpoint")
    assert got.value.code == "he_model_mismatch" and "calibration" in str(got.value)


# -- finding 3: parameters that cannot carry the circuit ----------------------------------------------


def test_parameters_must_carry_the_circuit_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    from msgate.config import load_settings
    from msgate.model.he.packing import Layout
    from msgate.model.he.params import circuit_depth

    deepest = max(he.Evaluator.depth_needed(Layout(b, 24, 96, 4096)) for b in (1, 4, 16, 32))
    assert circuit_depth() == deepest == 4
    with pytest.raises(he.HeParamError, match=r"MSGATE_HE__COEFF_MOD_BIT_SIZES.* gives 3 rescales; the circuit "
                                              r"needs 4: at least 6 primes"):
        he.HeParams(8192, (42, 32, 32, 32, 48), 32).check()
    monkeypatch.setenv("MSGATE_HE__ENABLED", "1")
    monkeypatch.setenv("MSGATE_HE__COEFF_MOD_BIT_SIZES", "[42,32,32,32,48]")
    with pytest.raises(ConfigError, match="MSGATE_HE__COEFF_MOD_BIT_SIZES"):
        load_settings()


# -- finding 4: the keys role opens its secret first, and survives the broker ---------------------------


def test_keys_role_refuses_a_secret_it_cannot_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """It reported 'ready' and every job then failed as a model error; the chmod advice reached no log."""
    from msgate.model.he_keys import HeKeys
    from msgate.model.he_service import run
    from msgate.storage.store import open_store

    store = open_store(make_settings(tmp_path / "home", "sqlite", he={"enabled": True}))
    try:
        stop = threading.Event()
        stop.set()
        run(store, stop)  # makes the key
        [secret] = list((tmp_path / "home" / "keys" / "he").glob("*.secret"))
        secret.chmod(0o644)  # restored from a backup with the umask's mode
        caplog.set_level(logging.INFO, logger="msgate.model.he_service")
        caplog.clear()
        with pytest.raises(KeyFilePermissions):
            run(store, stop)
        [record] = [r for r in caplog.records if r.getMessage().startswith("CKKS secret key cannot be opened")]
        assert record.levelno == logging.ERROR and "chmod 600" in record.reason  # type: ignore[attr-defined]
        assert not any(r.getMessage() == "CKKS key service ready" for r in caplog.records)
        secret.chmod(0o600)
        secret.write_text("{not json")
        with pytest.raises(ConfigError, match="damaged"):
            HeKeys(tmp_path / "home", store.ring).open_secret(secret.stem)
    finally:
        store.close()


def test_serving_loop_reconnects_after_a_broker_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis restart ended the keys role's thread (and so every role of its serve process)."""
    import redis.exceptions

    broker = _Broker()
    monkeypatch.setattr(he_rpc, "broker_connection", lambda settings: _connect())

    def _connect() -> _Conn:
        broker.connections += 1
        return _Conn(broker, redis.exceptions.ConnectionError("Connection refused") if broker.connections == 1 else None)

    broker.queues[he_rpc.REQUEST_QUEUE].put(_Msg({"op": "nope", "corr": "c1", "reply_to": "r1"}))
    stop, died = threading.Event(), []

    def role() -> None:
        try:
            he_rpc.serve(None, None, stop)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001
            died.append(exc)

    thread = threading.Thread(target=role, daemon=True)
    thread.start()
    try:
        reply = broker.queues["r1"].get(timeout=10).payload
    except queue.Empty:
        reply = None
    stop.set()
    thread.join(10)
    assert not died and not thread.is_alive()
    assert reply is not None and reply["code"] == "he_op" and broker.connections == 2
