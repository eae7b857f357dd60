"""The ``publish`` role end to end on the embedded broker: a real Celery consumer takes ``msgate.publish``,
renders the job, and the sender delivers to storescp and a python-hl7 MLLP receiver; a redelivered task
changes nothing."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlmodel import select

from msgate.results import outbox
from msgate.storage.models import AuditEvent, Job, OutboxEntry, Series, Study
from msgate.storage.store import open_store
from msgate.workers import celery_app
from msgate.workers.results_io import store_result
from tests.conftest import make_settings
from tests.integration.pacs_peers import (
    encode,
    flair_series,
    model_result,
    start_mllp_receiver,
    start_storescp,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.peer]


def test_publish_role_consumes_the_task_and_delivers(tmp_path: Path) -> None:
    scp = start_storescp(tmp_path / "scp")
    rx = start_mllp_receiver()
    settings = make_settings(tmp_path / "home", "sqlite", hl7_out={"host": "127.0.0.1", "port": rx.port},
                             pacs=[{"name": "pacs", "host": "127.0.0.1", "port": scp.port, "ae_title": scp.ae_title}])
    store = open_store(settings)
    stop = threading.Event()
    role = threading.Thread(target=outbox.run, args=(store, stop, outbox.Policy(poll=0.2)), daemon=True)
    try:
        for ds in flair_series(n=12, rows=40, cols=48, seed=21):
            store.ingest.store_instance(source=encode(ds))
        with store.db.session() as session:
            series = session.exec(select(Series)).one()
            series.role = "FLAIR"
            session.add(series)
            job = Job(study_id=series.study_id, idem_key="role", state="done")
            session.add(job)
            session.flush()
            job_id = job.id
        store_result(store, job_id=job_id, result=model_result((12, 40, 48)))
        role.start()
        app = celery_app.build_app(settings)
        app.send_task(celery_app.PUBLISH_TASK, args=[job_id])
        app.send_task(celery_app.PUBLISH_TASK, args=[job_id])  # redelivery: idempotent

        def delivered() -> bool:
            with store.db.session() as session:
                rows = session.exec(select(OutboxEntry)).all()
            return bool(rows) and all(r.state == "delivered" for r in rows)

        wait_until(delivered, 120, 0.3)
        wait_until(lambda: len(scp.files()) == 6 and len(rx.messages) == 1, 20)
        with store.db.session() as session:
            assert len(session.exec(select(OutboxEntry)).all()) == 7  # SEG, PM, 3 SC, SR + ORU
            assert session.exec(select(Study)).one().delivered_at is not None
            rendered = session.exec(select(AuditEvent).where(AuditEvent.kind == "results.rendered")).all()
        assert len(rendered) == 1
    finally:
        stop.set()
        role.join(60)
        assert not role.is_alive()
        store.close()
        rx.stop()
        scp.stop()
