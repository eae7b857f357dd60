"""Workers: time from study ready to result stored, and Celery + Redis against a direct predict loop.

Synthetic cases (FLAIR, optionally QSM/T1; random intensities, the shapes of a small clinical series)
are ingested encrypted, marked ready, and then:

- **latency**: one case at a time: ready -> scheduler scan -> Redis -> worker (solo, warmed up) ->
  result stored; p50/p95 of ``ready_to_result_ms`` and the stage breakdown (load = decrypt + parse,
  decode = pixel decode + volume assembly, transforms, inference, store);
- **throughput**: all cases ready at once through the same path, against a *direct loop* in one
  process doing the same work per case (load, decode, transforms, predict, store) with no queue.
  ``ratio_end_to_end`` counts the scheduler's scan (planning + job rows + publishing) on the Celery
  side; ``ratio_queue_only`` starts the clock when every job is published.

The model is ``msgate.model.predict`` (tiny preset) when its checkpoint loads, else the test double
(printed in the output; the double measures queue overhead only).

    python bench/workers.py [--cases 20] [--slices 32] [--size 128] [--embedded] [--batch 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

import test_workers_double as double  # noqa: E402
from conftest import PG_ADMIN, REDIS_URL  # noqa: E402
from sqlmodel import select  # noqa: E402

from msgate.config import load_settings  # noqa: E402
from msgate.storage import keyring  # noqa: E402
from msgate.storage.models import Job  # noqa: E402
from msgate.storage.store import Store, open_store  # noqa: E402
from msgate.workers import case as case_mod  # noqa: E402
from msgate.workers import runtime  # noqa: E402
from msgate.workers.celery_app import build_app  # noqa: E402
from msgate.workers.results_io import store_result  # noqa: E402
from msgate.workers.scheduler import Scheduler  # noqa: E402

STAGES = ("load_ms", "decode_ms", "transforms_ms", "inference_ms", "store_ms", "queue_wait_ms", "ready_to_result_ms")


def pick_model() -> str:
    try:
        from msgate.model import predict

        predict.load_model()
        return "msgate.model.predict"
    except Exception as exc:  # no checkpoint yet
        print(f"real model unavailable ({type(exc).__name__}); using the test double", file=sys.stderr)
        return "test_workers_double"


def make_settings(home: Path, embedded: bool, model: str, batch: int) -> Any:
    workers = {"model_module": model, "ehr_deadline_seconds": 0, "required_ehr_fields": [], "batch_size": batch,
               "batch_wait_seconds": 0.0, "queue_prefix": f"bench-{uuid.uuid4().hex[:6]}:"}
    if embedded:
        return load_settings(home=home, storage={"min_free_bytes": 0}, workers=workers), None
    import psycopg

    name = f"msgate_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    keyring.init(home / "keys" / "keyring.json")
    return load_settings(home=home, database_url=url, broker_url=REDIS_URL, workers=workers,
                         storage={"min_free_bytes": 0, "blob_backend": "postgres"}), name


def worker_env(settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    env.update({"MSGATE_HOME": str(settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0", "MSGATE_LOG_LEVEL": "WARNING",
                "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "integration"), env.get("PYTHONPATH", "")])})
    if settings.database_url:
        env.update({"MSGATE_DATABASE_URL": settings.database_url, "MSGATE_BROKER_URL": settings.broker_url,
                    "MSGATE_STORAGE__BLOB_BACKEND": "postgres"})
    for key, value in settings.workers.model_dump().items():
        env[f"MSGATE_WORKERS__{key.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return env


def jobs_done(store: Store, ids: list[str]) -> list[Job]:
    with store.db.session() as session:
        rows = session.exec(select(Job).where(Job.id.in_(ids))).all()  # type: ignore[attr-defined]
    return list(rows) if len(rows) == len(ids) and all(j.state in ("done", "failed") for j in rows) else []


def wait_all(store: Store, ids: list[str], timeout: float = 900) -> list[Job]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done = jobs_done(store, ids)
        if done:
            return done
        time.sleep(0.02)
    raise TimeoutError("jobs did not finish")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(q * (len(values) - 1))))], 1)


def summary(jobs: list[Job]) -> dict[str, dict[str, float]]:
    out = {}
    for stage in STAGES:
        vals = [float(j.stages[stage]) for j in jobs if stage in j.stages]
        if vals:
            out[stage] = {"p50": pct(vals, 0.5), "p95": pct(vals, 0.95), "mean": round(statistics.mean(vals), 1)}
    return out


def direct_loop(store: Store, rt: runtime.Runtime, jobs: list[Job]) -> float:
    """The same per-case work as the worker, in one process, no queue."""
    start = time.perf_counter()
    for job in jobs:
        loaded = case_mod.load(store, job_id=job.id, study_id=job.study_id,
                               series={k: int(v) for k, v in job.flags["series"].items()}, actor="bench")
        pre = rt.preprocess()
        case = pre(loaded.case) if pre else loaded.case
        [result] = rt.predict([case])
        store_result(store, job_id=job.id, result=result)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--roles", default="FLAIR,QSM,T1")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--embedded", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = pick_model()
    roles = tuple(args.roles.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        settings, dbname = make_settings(Path(tmp) / "home", args.embedded, model, args.batch)
        store = open_store(settings)
        sched = Scheduler(store, build_app(settings))
        proc = subprocess.Popen([sys.executable, "-m", "msgate", "serve", "--role", "worker"], env=worker_env(settings),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            report = run(args, store, sched, roles, settings, model)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            store.close()
            if dbname:
                import psycopg

                with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def _studies(store: Store, args: Any, roles: tuple[str, ...], first_seed: int) -> list[int]:
    ids = []
    for i in range(args.cases):
        study_uid = double.generate_uid()
        sid = 0
        for role in roles:
            sid = double.add_series(store, study_uid=study_uid, role=role, mrn=f"B{first_seed + i}",
                                    accession=f"A{first_seed + i}", slices=args.slices, seed=first_seed + i,
                                    size=args.size)
        ids.append(sid)
    return ids


def run(args: Any, store: Store, sched: Scheduler, roles: tuple[str, ...], settings: Any, model: str) -> dict[str, Any]:
    # warm the worker (model load + warm-up happen before it takes messages)
    [warm] = _studies(store, argparse.Namespace(cases=1, slices=args.slices, size=args.size), roles, 9000)
    double.mark_ready(store, warm)
    wait_all(store, sched.scan())
    latency_jobs = []
    for sid in _studies(store, args, roles, 0):  # latency: one case at a time
        double.mark_ready(store, sid)
        latency_jobs += wait_all(store, sched.scan())
    rt = runtime.Runtime(settings, store)
    rt.model()
    direct_before = direct_loop(store, rt, latency_jobs)  # the same 20 cases' work, no queue
    batch_ids = _studies(store, args, roles, 1000)  # throughput: all ready at once
    start = time.perf_counter()
    for sid in batch_ids:
        double.mark_ready(store, sid)
    ids = sched.scan()
    scanned = time.perf_counter()
    tput_jobs = wait_all(store, ids)
    end = time.perf_counter()
    celery_s, queue_s = end - start, end - scanned
    direct_after = direct_loop(store, rt, tput_jobs)
    direct_s = (direct_before + direct_after) / 2  # before and after the Celery run: drift on a shared VM
    return {"model": model, "broker": "embedded sqlite" if args.embedded else "redis + postgresql",
            "cases": args.cases, "roles": list(roles), "slices": args.slices, "matrix": args.size,
            "batch_size": args.batch, "latency": summary(latency_jobs),
            "throughput": {"celery_s": round(celery_s, 2), "scan_s": round(celery_s - queue_s, 2),
                           "queue_s": round(queue_s, 2), "direct_s": round(direct_s, 2),
                           "direct_runs_s": [round(direct_before, 2), round(direct_after, 2)],
                           "celery_cases_per_s": round(args.cases / celery_s, 3),
                           "direct_cases_per_s": round(args.cases / direct_s, 3),
                           "ratio_end_to_end": round(direct_s / celery_s, 3),
                           "ratio_queue_only": round(direct_s / queue_s, 3), "stages": summary(tput_jobs)},
            "failed": [j.error for j in latency_jobs + tput_jobs if j.state != "done"]}


if __name__ == "__main__":
    main()
