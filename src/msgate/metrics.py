"""Prometheus metrics (prometheus-client), one endpoint per ``msgate serve`` process.

Counters and histograms are updated where the work happens (ingest, ACK paths, tasks, the outbox
sender: one ``DELIVERIES`` count per recorded attempt, :mod:`msgate.results.outbox`);
queue depth, job states and outbox backlog are read from the database at scrape time by
:class:`StoreCollector`, so every process reports the same system-wide view. Names are documented in
docs/operations.md ("Metrics").
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlmodel import col, func, select

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

INSTANCES = Counter("msgate_instances_received", "DICOM instances received, by outcome "
                    "(stored, duplicate, rejected, transient)", ["outcome"], registry=REGISTRY)
HL7_MESSAGES = Counter("msgate_hl7_messages_received", "HL7 messages received, by outcome "
                       "(stored, duplicate, rejected, transient)", ["outcome"], registry=REGISTRY)
INGEST_SECONDS = Histogram("msgate_ingest_seconds", "Durable ingest time (encrypt, fsync, commit), by kind",
                           ["kind"], registry=REGISTRY,
                           buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
ACK_SECONDS = Histogram("msgate_ack_latency_seconds", "Time from a message's arrival to its acknowledgement",
                        ["protocol"], registry=REGISTRY,
                        buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1))
STAGE_SECONDS = Histogram("msgate_job_stage_seconds", "Job stage durations (load, decode, transforms, "
                          "inference, store)", ["stage"], registry=REGISTRY,
                          buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
INFERENCE_SECONDS = Histogram("msgate_model_inference_seconds", "Model predict time per batch", registry=REGISTRY,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
DELIVERIES = Counter("msgate_outbox_deliveries", "Outbox send attempts, by kind (dicom, hl7) and outcome "
                     "(delivered, retry, dead, expired, interrupted)", ["kind", "outcome"], registry=REGISTRY)


class StoreCollector(Collector):
    """System-wide gauges read from the database at scrape time."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from msgate.storage.models import Job, OutboxEntry, Study, utcnow

        try:
            with self.db.session() as session:
                jobs = dict(session.exec(select(Job.state, func.count()).group_by(Job.state)).all())
                studies = dict(session.exec(select(Study.state, func.count()).group_by(Study.state)).all())
                backlog = session.exec(select(func.count(), func.min(OutboxEntry.created_at))
                                       .where(col(OutboxEntry.state).in_(("pending", "sending")))).one()
                dead = session.exec(select(func.count()).where(OutboxEntry.state == "dead")).one()
        except Exception:  # a scrape must never crash the role; the DB being down shows as missing series
            log.warning("metrics collection failed", extra={"reason": "database"})
            return
        yield _labelled("msgate_jobs", "Jobs by state", "state", jobs)
        yield _labelled("msgate_studies", "Studies by state", "state", studies)
        yield GaugeMetricFamily("msgate_queue_depth", "Jobs queued and not yet running", value=jobs.get("queued", 0))
        yield GaugeMetricFamily("msgate_outbox_backlog", "Outbox entries not yet delivered", value=backlog[0])
        oldest = (utcnow() - backlog[1]).total_seconds() if backlog[1] else 0.0
        yield GaugeMetricFamily("msgate_outbox_oldest_seconds", "Age of the oldest undelivered entry", value=oldest)
        yield GaugeMetricFamily("msgate_outbox_dead_letters", "Dead-lettered outbox entries", value=dead)


def _labelled(name: str, doc: str, label: str, values: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


_collector: StoreCollector | None = None


def serve(db: Any, host: str, port: int) -> Any:
    """Start the HTTP endpoint (once per process). Returns the server, or None if the port is taken."""
    global _collector
    if _collector is None:
        _collector = StoreCollector(db)
        REGISTRY.register(_collector)
    try:
        server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:  # named: "in use" and "cannot assign that address" need different fixes
        log.warning("metrics port unavailable; the endpoint is off in this process",
                    extra={"port": port, "code": exc.errno,
                           "reason": errno.errorcode.get(exc.errno or 0, "unknown")})
        return None
    log.info("metrics endpoint up", extra={"host": host, "port": server.server_port})
    return server


def window(hours: float = 1.0) -> timedelta:
    return timedelta(hours=hours)
