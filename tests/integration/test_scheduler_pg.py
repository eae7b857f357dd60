"""The scheduler on PostgreSQL: an EHR change whose transaction commits seconds after its row was
written is still seen (the watermark overlaps the previous scan)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import test_workers_double as double
from conftest import make_settings

from msgate.storage import keyring
from msgate.storage.models import Observation
from msgate.storage.store import open_store
from msgate.workers.celery_app import build_app
from msgate.workers.scheduler import Scheduler

pytestmark = [pytest.mark.integration]

WORKERS = {"model_module": "test_workers_double", "ehr_deadline_seconds": 0, "required_ehr_fields": []}


def test_a_change_committed_late_is_still_planned(tmp_path: Path, pg_url: str) -> None:
    """The HL7 side writes a batch of mapped messages in one transaction: the new NfL value's
    ``updated_at`` is set, and the row becomes visible 2.5 s later. A scan in between does not see it;
    the next scans must (the watermark used to move 1 s behind each scan, past the row)."""
    home = tmp_path / "home"
    keyring.init(home / "keys" / "keyring.json")
    store = open_store(make_settings(home, "postgres", pg_url, workers=WORKERS))
    try:
        double.make_study(store, seed=13)
        patient_id = double.add_patient(store, mrn="MRN00013")
        sched = Scheduler(store, build_app(store.settings))
        [first] = sched.scan()
        written = threading.Event()

        def slow_batch() -> None:
            with store.db.session() as session:
                session.add(Observation(patient_id=patient_id, feature="nfl", code="101281-4", code_system="LN",
                                        value_enc=store.cipher.encrypt("9.0", column="observation.value"),
                                        value_type="NM", unit="pg/mL", observed_at=datetime(2026, 10, 1, tzinfo=UTC)))
                session.flush()
                written.set()
                time.sleep(2.5)  # more messages of the batch; then the commit

        writer = threading.Thread(target=slow_batch)
        writer.start()
        assert written.wait(10)
        time.sleep(1.3)
        assert sched.scan() == []  # not committed yet
        writer.join(10)
        created = sched.scan() + sched.scan()
        assert len(created) == 1 and created[0] != first
    finally:
        store.close()
