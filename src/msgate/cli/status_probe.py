"""What ``msgate status`` measures: one function per component, each returning a plain dict.

Health levels: ``ok``, ``degraded`` (works but needs attention), ``down``. Nothing here prints PHI:
errors shown are msgate's own reason strings.
"""

from __future__ import annotations

import socket
import statistics
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, exists, func, select

from msgate.cli.common import head_revision, schema_mismatch
from msgate.config import Settings
from msgate.errors import MsgateError
from msgate.storage import heartbeat, keyring
from msgate.storage.blobs import free_bytes
from msgate.storage.db import Database
from msgate.storage.models import Job, OutboxEntry, Series, Study, utcnow

QUEUES = ("gpu", "publish")
PIPELINE_ROLES = ("dicom", "hl7", "scheduler", "worker", "publish")
HE_ROLES = ("keys",)  # required as well while settings.he.enabled
JOB_FAILURES = 3  # failed jobs in the window, at least this many ...
JOB_FAILURE_RATIO = 0.5  # ... and at least this share of the jobs that finished in it: degraded
SCHEDULER_SLACK_S = 60.0  # beyond deadline + scan period: a slow scan, the status query's own delay
STALE_AFTER_S = heartbeat.INTERVAL_S * 4
OUTBOX_STALE_S = 900.0
SCHEMA_MISSING = "schema missing; run msgate db upgrade"
# compose's health check allows 15 s; libpq may try twice (SSL, then plain), each within connect_timeout
DB_LIMITS = {"connect_timeout": 3, "statement_timeout_ms": 5000}
LOOPBACK = ("0.0.0.0", "::", "", "127.0.0.1", "::1", "localhost")


def database(db: Database) -> dict[str, Any]:
    """Reachable and migrated; a database without msgate's schema is down (nothing can run on it), one at
    another revision than this msgate's is degraded (it said ok, while every other command failed on it)."""
    if not db.ping():
        return {"health": "down", "reason": "database unreachable"}
    backend = "sqlite" if db.is_sqlite else "postgresql"
    try:
        revision = db.current_revision()
    except (MsgateError, SQLAlchemyError) as exc:
        return failed("database", exc) | {"backend": backend}
    if not revision:
        return {"health": "down", "reason": SCHEMA_MISSING, "backend": backend}
    mismatch = schema_mismatch(revision)
    if mismatch:
        return {"health": "degraded", "revision": revision, "expected": head_revision(), "backend": backend,
                "reason": mismatch}
    return {"health": "ok", "revision": revision, "backend": backend}


def failed(what: str, exc: Exception) -> dict[str, Any]:
    """A probe that raised, as a down component. Only msgate's own text is shown: a driver's message
    may quote SQL parameters, so only its type is named."""
    detail = str(exc) if isinstance(exc, MsgateError) else type(exc).__name__
    return {"health": "down", "reason": f"{what} probe failed: {detail}"[:200]}


def keys(settings: Settings) -> dict[str, Any]:
    try:
        ring = keyring.load(settings.keyring_path)
    except Exception as exc:  # ConfigError / KeyFilePermissions carry operator-facing text
        return {"health": "down", "reason": str(exc)}
    now = utcnow()
    active_age = (now - ring.active.created).days
    return {"health": "ok", "active": ring.active_id, "active_age_days": active_age, "keys": len(ring.keks)}


def disk(settings: Settings) -> dict[str, Any]:
    free = free_bytes(settings.blob_dir)
    floor = settings.storage.min_free_bytes
    # the purge threshold concerns local blob bodies only (retention ignores it with PostgreSQL bodies):
    # applied to every home, it made each container's health check fail under 5 GiB free while ingest was fine
    purge = settings.storage.purge_free_bytes if settings.storage.blob_backend == "local" else 0
    if free < floor:
        reason = "free space below the ingest floor"
    elif free < purge:
        reason = "free space below the retention purge threshold (storage.purge_free_bytes)"
    else:
        reason = ""
    return {"health": "degraded" if reason else "ok", "free_gb": round(free / 1e9, 2),
            "floor_gb": round(floor / 1e9, 2), "reason": reason}


def required_roles(settings: Settings, available: list[str]) -> tuple[str, ...]:
    """The roles a running system needs, of those this build has: the pipeline, and the key service in
    homomorphic mode (without it every HE job fails)."""
    wanted = PIPELINE_ROLES + (HE_ROLES if settings.he.enabled else ())
    return tuple(role for role in wanted if role in available)


def roles(db: Database, expected: tuple[str, ...],
          ports: dict[str, tuple[str, int]] | None = None) -> dict[str, dict[str, Any]]:
    """Each role from its heartbeats; a listener role (``ports``: role -> host, port) is healthy only
    with its port answering."""
    now = utcnow()
    beats = heartbeat.read(db)
    out: dict[str, dict[str, Any]] = {}
    for role in expected:
        mine = [b for b in beats if b.role == role]
        live = [b for b in mine if (now - b.beat_at).total_seconds() <= STALE_AFTER_S]
        info: dict[str, Any] = {"instances": len(live)}
        for beat in live:
            info.update(beat.info)
        if live:
            info["health"] = "ok"
            if info.get("quarantined"):  # the dicom role: acknowledged instances it could not index
                info["health"] = "degraded"
                info["reason"] = (f"{info['quarantined']} received instances are quarantined (not indexed); "
                                  "see msgate studies quarantine")
            if role in (ports or {}):
                _check_port(info, live, *(ports or {})[role])
        else:
            info["health"] = "down"
            info["reason"] = "stale heartbeat (crashed?)" if mine else "not running"
        out[role] = info
    return out


def _check_port(info: dict[str, Any], live: list[Any], host: str, port: int) -> None:
    """A fresh heartbeat with a port that does not answer (the listener died or never bound while its
    process lives, or it is still indexing its journal) is degraded. A wildcard or loopback bind is probed
    on loopback, which says nothing about an instance on another machine: then it is not checked."""
    here = heartbeat.instance_name().rsplit(":", 1)[0]
    if host in LOOPBACK and not any(b.instance.rsplit(":", 1)[0] == here for b in live):
        info["port_open"] = None  # not checked from this host
        return
    info["port_open"] = port_open(host, port)
    if not info["port_open"]:
        info["health"] = "degraded"
        info["reason"] = f"port {port} not answering"


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    target = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    try:
        with socket.create_connection((target, port), timeout=timeout):
            return True
    except OSError:
        return False


def broker(settings: Settings) -> dict[str, Any]:
    """Reachability and queue depths; workers answer Celery's ping where the broker supports broadcast."""
    from kombu import Connection

    url = settings.resolved_broker_url
    depths: dict[str, int] = {}
    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            channel = conn.default_channel
            for queue in QUEUES:
                try:
                    depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
                except Exception:  # not declared yet: nothing queued
                    depths[queue] = 0
    except Exception:
        return {"health": "down", "reason": "broker unreachable", "kind": url.split(":", 1)[0]}
    result: dict[str, Any] = {"health": "ok", "kind": url.split(":", 1)[0], "queues": depths}
    if url.startswith("redis"):
        result["workers"] = celery_ping(url)
    return result


def celery_ping(url: str) -> list[str]:
    from celery import Celery

    app = Celery(broker=url)
    try:
        replies = app.control.inspect(timeout=2.0).ping() or {}
    except Exception:
        return []
    finally:
        app.close()
    return sorted(replies)


def jobs(db: Database, hours: float = 1.0, *, fail_count: int = JOB_FAILURES,
         fail_ratio: float = JOB_FAILURE_RATIO) -> dict[str, Any]:
    """Jobs created in the window by state, time to result, and the jobs that finished in it: at least
    ``fail_count`` failures that are at least ``fail_ratio`` of the finished jobs are degraded (the model
    or the data path is broken while every role's heartbeat is fine)."""
    since = utcnow() - timedelta(hours=hours)
    ended = func.coalesce(col(Job.finished_at), col(Job.created_at))  # the worker sets finished_at; else created
    with db.session() as session:
        counts = dict(session.exec(select(Job.state, func.count()).where(Job.created_at >= since)
                                   .group_by(Job.state)).all())
        done = session.exec(select(Job.created_at, Job.finished_at).where(
            Job.state == "done", col(Job.finished_at).is_not(None), Job.created_at >= since)).all()
        finished = dict(session.exec(select(Job.state, func.count()).where(
            col(Job.state).in_(("done", "failed")), ended >= since).group_by(Job.state)).all())
        failures = session.exec(select(Job.id, Job.error).where(Job.state == "failed", ended >= since)
                                .order_by(ended.desc()).limit(3)).all()
    durations = sorted((f - c).total_seconds() for c, f in done if f is not None)
    p50 = statistics.median(durations) if durations else None
    p95 = durations[max(0, int(round(0.95 * len(durations))) - 1)] if durations else None
    failed, total = finished.get("failed", 0), finished.get("failed", 0) + finished.get("done", 0)
    failing = failed >= fail_count and failed >= fail_ratio * total
    return {"health": "degraded" if failing else "ok", "last_hour": counts, "p50_s": p50, "p95_s": p95,
            "failed": failed, "finished": total,
            "reason": f"{failed} of {total} jobs finished in the last {hours:g} h failed" if failing else "",
            "recent_failures": [{"job": jid[:8], "reason": (err or "")[:120]} for jid, err in failures]}


def studies(db: Database, settings: Settings) -> dict[str, Any]:
    """Ready studies with a FLAIR series and no job at all, ready for longer than the scheduler can explain
    (the EHR deadline, a scan period and :data:`SCHEDULER_SLACK_S`): the scheduler is not running, or it
    cannot load the model and creates no jobs. Degraded; one that waits for its EHR is not counted."""
    wk = settings.workers
    wait_s = wk.ehr_deadline_seconds + wk.scan_seconds + SCHEDULER_SLACK_S
    now = utcnow()
    has_flair = exists().where(col(Series.study_id) == col(Study.id), col(Series.role) == "FLAIR")
    has_job = exists().where(col(Job.study_id) == col(Study.id))
    with db.session() as session:
        stuck, oldest = session.exec(select(func.count(), func.min(Study.ready_at)).where(
            Study.state == "ready", col(Study.ready_at) <= now - timedelta(seconds=wait_s), has_flair,
            ~has_job)).one()
    age = (now - oldest).total_seconds() if oldest else 0.0
    reason = (f"{stuck} ready studies with a FLAIR series have no job after {wait_s:.0f}s: is the scheduler "
              "running, and can it load the model?") if stuck else ""
    return {"health": "degraded" if stuck else "ok", "stuck": stuck, "oldest_s": round(age, 1), "reason": reason}


def outbox(db: Database) -> dict[str, Any]:
    with db.session() as session:
        backlog, oldest = session.exec(select(func.count(), func.min(OutboxEntry.created_at)).where(
            col(OutboxEntry.state).in_(("pending", "sending")))).one()
        dead = session.exec(select(func.count()).where(OutboxEntry.state == "dead")).one()
        errors = session.exec(select(OutboxEntry.destination, OutboxEntry.last_error).where(
            col(OutboxEntry.last_error).is_not(None), col(OutboxEntry.state).in_(("pending", "sending", "dead")))
            .order_by(col(OutboxEntry.next_attempt_at).desc()).limit(3)).all()
    age = (utcnow() - oldest).total_seconds() if oldest else 0.0
    failing = backlog > 0 and bool(errors)  # undelivered entries whose last attempt failed: a peer is down
    health = "degraded" if dead or failing or age >= OUTBOX_STALE_S else "ok"
    return {"health": health, "backlog": backlog, "oldest_s": round(age, 1), "dead_letters": dead,
            "recent_errors": [{"destination": d, "reason": (e or "")[:120]} for d, e in errors]}
