"""A correction at the PACS: two jobs of one study (the second supersedes the first) go through the
``publish`` role (a real Celery consumer on the embedded broker, and the outbox lanes) to two real
pynetdicom storage SCPs. The replacement SEG, parametric map and key images name the result they
replace in their Series Description; the PACS with ``iocm_rejection`` on also gets an IHE IOCM
rejection note (KOS, "Rejected for Quality Reasons", DCM 113001) listing exactly the first job's
SEG, map and key images it received; the other PACS gets none."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import highdicom as hd
import pytest
from pydicom.dataset import Dataset
from sqlmodel import select

from msgate.results import outbox
from msgate.storage.models import Job, OutboxEntry, Series
from msgate.storage.store import Store, open_store
from msgate.workers import celery_app
from msgate.workers.results_io import store_result
from tests.conftest import make_settings
from tests.integration.pacs_peers import (
    encode,
    flair_series,
    model_result,
    start_scripted_scp,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.peer]
SEG, PM, SC = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.7"
SR, KOS = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.59"
SHAPE = (12, 40, 48)


def _delivered(store: Store, job_id: str) -> bool:
    with store.db.session() as session:
        rows = session.exec(select(OutboxEntry).where(OutboxEntry.job_id == job_id)).all()
    return bool(rows) and all(r.state == "delivered" for r in rows)


def _of(received: list[Dataset], *classes: str) -> list[Dataset]:
    return [ds for ds in received if ds.SOPClassUID in classes]


def _when(ds: Dataset) -> str:
    """The series date and time as the replacement names it (YYYY-MM-DD HH:MM)."""
    date, time = str(ds.SeriesDate), str(ds.SeriesTime)
    return f"{date[:4]}-{date[4:6]}-{date[6:8]} {time[:2]}:{time[2:4]}"


def test_a_correction_names_what_it_replaces_and_rejects_it_where_iocm_is_on(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    iocm, plain = start_scripted_scp([], ae_title="IOCM"), start_scripted_scp([], ae_title="PLAIN")
    pg = request.getfixturevalue("pg_url") if backend == "postgres" else None
    if backend == "postgres":
        from msgate.storage import keyring

        keyring.init(tmp_path / "home" / "keys" / "keyring.json")
    settings = make_settings(tmp_path / "home", backend, pg, pacs=[
        {"name": "iocm", "host": "127.0.0.1", "port": iocm.port, "ae_title": "IOCM", "iocm_rejection": True},
        {"name": "plain", "host": "127.0.0.1", "port": plain.port, "ae_title": "PLAIN"}])
    store = open_store(settings)
    stop = threading.Event()
    role = threading.Thread(target=outbox.run, args=(store, stop, outbox.Policy(poll=0.2)), daemon=True)
    try:
        for ds in flair_series(n=SHAPE[0], rows=SHAPE[1], cols=SHAPE[2], seed=31):
            store.ingest.store_instance(source=encode(ds))
        with store.db.session() as session:
            series = session.exec(select(Series)).one()
            series.role = "FLAIR"
            session.add(series)
            first = Job(study_id=series.study_id, idem_key="correction-1", state="done")
            session.add(first)
            session.flush()
            first_id, study_id = first.id, series.study_id
        store_result(store, job_id=first_id, result=model_result(SHAPE))
        role.start()
        app = celery_app.build_app(settings)
        app.send_task(celery_app.PUBLISH_TASK, args=[first_id])
        wait_until(lambda: _delivered(store, first_id), 120, 0.3)
        before = {"iocm": list(iocm.received), "plain": list(plain.received)}
        assert len(_of(before["iocm"], SEG, PM, SC)) == 5  # SEG, map, 3 key images

        with store.db.session() as session:  # what the scheduler does for a changed input
            session.get(Job, first_id).state = "superseded"  # type: ignore[union-attr]
            second = Job(study_id=study_id, idem_key="correction-2", state="done", supersedes_id=first_id)
            session.add(second)
            session.flush()
            second_id = second.id
        store_result(store, job_id=second_id, result=model_result(SHAPE, edss=5.5))
        app.send_task(celery_app.PUBLISH_TASK, args=[second_id])
        wait_until(lambda: _delivered(store, second_id), 120, 0.3)
        after = {"iocm": iocm.received[len(before["iocm"]):], "plain": plain.received[len(before["plain"]):]}
    finally:
        stop.set()
        role.join(60)
        store.close()
        iocm.stop()
        plain.stop()
    assert not role.is_alive()

    old, new = before["iocm"], after["iocm"]
    for sop_class in (SEG, PM, SC, SR):
        was = {str(ds.SeriesDescription) for ds in _of(old, sop_class)}
        now = {str(ds.SeriesDescription) for ds in _of(new, sop_class)}
        assert len(was) == 1 and len(now) == 1 and was != now, (sop_class, was, now)
        (text,) = now
        assert len(text) <= 64 and "replaces" not in next(iter(was))
        assert f"replaces {_when(_of(old, sop_class)[0])}" in text, text  # names the result it replaces
    assert {str(ds.SeriesDescription) for ds in _of(after["plain"], SEG, PM, SC)} == \
        {str(ds.SeriesDescription) for ds in _of(new, SEG, PM, SC)}

    _check_rejection(_of(new, KOS), rejected=_of(old, SEG, PM, SC), current=_of(new, SEG, PM, SC, SR),
                     folder=tmp_path)
    assert _of(after["plain"], KOS) == [] and _of(plain.received, KOS) == []
    assert _of(old, KOS) == []  # a first result rejects nothing


def _check_rejection(notes: list[Dataset], *, rejected: list[Dataset], current: list[Dataset], folder: Path) -> None:
    assert len(notes) == 1, f"{len(notes)} rejection notes"
    kos = hd.ko.KeyObjectSelectionDocument.from_dataset(notes[0])
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    assert title.CodeMeaning == "Rejected for Quality Reasons"
    study = rejected[0].StudyInstanceUID
    assert kos.StudyInstanceUID == study and kos.PatientID == rejected[0].PatientID
    want = {(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)) for ds in rejected}
    (evidence,) = kos.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == study
    listed = {(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID), str(s.SeriesInstanceUID))
              for s in evidence.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert listed == want  # exactly the first job's SEG, map and key images; not the SR, not the new ones
    items = {(str(i.ReferencedSOPSequence[0].ReferencedSOPClassUID), str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
             for i in kos.ContentSequence if "ReferencedSOPSequence" in i}
    assert items == {(c, u) for c, u, _ in want}
    assert not {str(ds.SOPInstanceUID) for ds in current} & {u for _, u, _ in listed}
    path = folder / "kos.dcm"
    notes[0].save_as(path, enforce_file_format=True)
    run = subprocess.run(["dciodvfy", "-new", str(path)], check=False, capture_output=True, text=True, timeout=60)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert errors == []
