"""Results delivered to real peers: DCMTK storescp and Orthanc get SR, SEG, PM and SC; a python-hl7 MLLP
receiver gets the ORU. Everything received is read back (dsrdump, dciodvfy, highdicom, hl7apy).

The images carry no IssuerOfPatientID (as most scanners send them) and ``dicom.default_issuer`` is HOSP; the
HL7 feed sent the order ``PL-R-1^EPIC`` for patient ``MRN-R-1^^^HOSP``: the ORU on the wire names both so."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset
from sqlmodel import select

from msgate.hl7.mapping import map_messages
from msgate.hl7.msh import read_msh
from msgate.model.types import ModelResult
from msgate.results import codes, outbox
from msgate.results.publish import publish_job
from msgate.results.sources import sort_slices
from msgate.storage.models import Job, OutboxEntry, Series, Study
from msgate.storage.store import Store, open_store
from msgate.workers.results_io import store_result
from tests.conftest import make_settings
from tests.integration.pacs_peers import (
    MllpReceiver,
    Orthanc,
    StoreScp,
    encode,
    flair_series,
    model_result,
    start_mllp_receiver,
    start_orthanc,
    start_storescp,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.peer]
ORDER = ("MSH|^~\\&|RIS|HOSP|||20261119||OMI^O23^OMI_O23|O-R-1|P|2.5.1\r"
         "PID|1||MRN-R-1^^^HOSP^MR||RESULTS^TEST||19800202|F\r"
         "ORC|NW|PL-R-1^EPIC|FL-R-1^RIS^1.2.3.4^ISO\rOBR|1|PL-R-1^EPIC|FL-R-1^RIS^1.2.3.4^ISO|MR^MRI brain\r"
         "IPC|ACC-R-1|RP1|1.2.3|SPS1|MR\r")
SOP = {"sr": "1.2.840.10008.5.1.4.1.1.88.34", "seg": "1.2.840.10008.5.1.4.1.1.66.4",
       "pm": "1.2.840.10008.5.1.4.1.1.30", "sc": "1.2.840.10008.5.1.4.1.1.7"}


@dataclass
class Delivered:
    store: Store
    scp: StoreScp
    orthanc: Orthanc
    mllp: MllpReceiver
    sources: list[Dataset]
    result: ModelResult
    job_id: str
    tmp: Path

    def received(self, sop_class: str) -> list[Dataset]:
        return [ds for ds in self.scp.datasets() if ds.SOPClassUID == sop_class]

    def path_of(self, sop_class: str) -> Path:
        from pydicom import dcmread

        return next(p for p in self.scp.files() if dcmread(p, stop_before_pixels=True).SOPClassUID == sop_class)


def _ingest_flair(store: Store, sources: list[Dataset]) -> int:
    for ds in sources:
        store.ingest.store_instance(source=encode(ds))
    with store.db.session() as session:
        series = session.exec(select(Series)).one()
        series.role = "FLAIR"
        session.add(series)
        return series.study_id


@pytest.fixture(scope="module")
def delivered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Delivered]:
    tmp = tmp_path_factory.mktemp("results-peers")
    scp = start_storescp(tmp / "storescp")
    orthanc = start_orthanc(tmp / "orthanc")
    mllp = start_mllp_receiver()
    sources = flair_series(n=12, rows=40, cols=48, seed=11)
    for ds in sources:
        del ds.IssuerOfPatientID
    subprocess.run(["storescu", "-aec", orthanc.ae_title, "127.0.0.1", str(orthanc.dicom_port),
                    *[str(_write(tmp / "flair", ds)) for ds in sources]], check=True, timeout=60,
                   env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}, capture_output=True)
    settings = make_settings(tmp / "home", "sqlite", pacs=[
        {"name": "storescp", "host": "127.0.0.1", "port": scp.port, "ae_title": scp.ae_title},
        {"name": "orthanc", "host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": orthanc.ae_title},
    ], hl7_out={"host": "127.0.0.1", "port": mllp.port}, dicom={"default_issuer": "HOSP"})
    store = open_store(settings)
    study_id = _ingest_flair(store, sources)
    stored = store.ingest.store_hl7(raw=ORDER.encode(), header=read_msh(ORDER.encode()).header())
    assert map_messages(store, [stored.message_id])[stored.message_id].state == "mapped"
    with store.db.session() as session:
        job = Job(study_id=study_id, idem_key="peers", state="done")
        session.add(job)
        session.flush()
        job_id = job.id
    result = model_result((12, 40, 48))
    store_result(store, job_id=job_id, result=result)
    assert publish_job(store, job_id) == "queued"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and outbox.run_once(store):
        pass
    yield Delivered(store, scp, orthanc, mllp, sort_slices(sources), result, job_id, tmp)
    store.close()
    mllp.stop()
    orthanc.stop()
    scp.stop()


def _write(folder: Path, ds: Dataset) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_every_entry_delivered_once_and_study_marked(delivered: Delivered) -> None:
    with delivered.store.db.session() as session:
        entries = session.exec(select(OutboxEntry)).all()
        study = session.exec(select(Study)).one()
    assert entries and all(e.state == "delivered" and e.attempts == 1 for e in entries)
    assert {e.destination for e in entries} == {"storescp", "orthanc", "hl7"}
    assert study.delivered_at is not None
    classes = sorted(ds.SOPClassUID for ds in delivered.scp.datasets())
    assert classes == sorted([SOP["sr"], SOP["seg"], SOP["pm"], *[SOP["sc"]] * 3])


def test_dsrdump_parses_the_sr_without_errors_or_warnings(delivered: Delivered) -> None:
    run = subprocess.run(["dsrdump", str(delivered.path_of(SOP["sr"]))], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert "Imaging Measurement Report" in run.stdout and "UNVERIFIED" in run.stdout


@pytest.mark.parametrize("kind", ["sr", "seg", "pm", "sc"])
def test_dciodvfy_reports_no_errors(delivered: Delivered, kind: str) -> None:
    run = subprocess.run(["dciodvfy", "-new", str(delivered.path_of(SOP[kind]))], capture_output=True, text=True,
                         timeout=60)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_highdicom_reads_back_what_storescp_received(delivered: Delivered) -> None:
    sr = hd.sr.srread(delivered.path_of(SOP["sr"]))
    group = sr.content.get_image_measurement_groups()[0]
    values = {m.name.value: m.value for m in group.get_measurements()}
    assert values[codes.P_MS.value] == pytest.approx(delivered.result.p_ms)
    assert values[codes.EDSS_ESTIMATE.value] == pytest.approx(delivered.result.edss_estimate)
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == len(delivered.result.lesions)
    seg = hd.seg.segread(delivered.path_of(SOP["seg"]))
    uids = [str(ds.SOPInstanceUID) for ds in delivered.sources]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                               relabel=True)
    number_of = {int(str(s.SegmentLabel).removeprefix("Lesion ")): int(s.SegmentNumber) for s in seg.SegmentSequence}
    assert sorted(number_of) == [lesion.label for lesion in delivered.result.lesions]  # one segment per lesion
    expected = np.zeros(delivered.result.lesion_mask.shape, dtype=np.int64)
    for label, number in number_of.items():
        expected[delivered.result.lesion_mask == label] = number
    np.testing.assert_array_equal(pixels, expected)
    refs = {r.ReferencedSOPInstanceUID for r in sr.CurrentRequestedProcedureEvidenceSequence[0]
            .ReferencedSeriesSequence[0].ReferencedSOPSequence}
    assert refs <= set(uids) | {seg.SOPInstanceUID}


def test_orthanc_lists_the_objects_in_the_original_study(delivered: Delivered) -> None:
    study_uid = str(delivered.sources[0].StudyInstanceUID)
    studies = delivered.orthanc.get("/studies?expand")
    assert isinstance(studies, list) and len(studies) == 1
    assert studies[0]["MainDicomTags"]["StudyInstanceUID"] == study_uid
    series = delivered.orthanc.get(f"/studies/{studies[0]['ID']}/series?expand")
    assert isinstance(series, list)
    modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
    assert modalities == ["MR", "OT", "OT", "SEG", "SR"]  # FLAIR, parametric map + key images (OT), SEG, SR
    instances = sum(len(s["Instances"]) for s in series)
    assert instances == 12 + 1 + 1 + 1 + 3


def test_mllp_receiver_gets_a_strictly_valid_oru(delivered: Delivered) -> None:
    assert len(delivered.mllp.messages) == 1 and delivered.mllp.answered == ["AA"]
    er7 = delivered.mllp.messages[0].replace("\n", "\r")
    msg = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    msg.validate()
    sr = delivered.received(SOP["sr"])[0]
    assert sr.SOPInstanceUID in er7
    obr = next(line for line in er7.split("\r") if line.startswith("OBR")).split("|")
    assert obr[18] == delivered.sources[0].AccessionNumber


def test_the_oru_names_the_linked_patient_and_the_order_as_the_feed_sent_them(delivered: Delivered) -> None:
    """PID-3 said ``MRN-R-1^^^^MR`` (no authority, though the study was linked to HOSP|MRN-R-1) and ORC-2
    ``PL-R-1`` (the EHR keys its orders by number and namespace)."""
    er7 = delivered.mllp.messages[0].replace("\n", "\r")
    seg = {line[:3]: line.split("|") for line in er7.split("\r") if line}
    assert seg["PID"][3] == "MRN-R-1^^^HOSP^MR"
    assert (seg["ORC"][2], seg["ORC"][3]) == ("PL-R-1^EPIC", "FL-R-1^RIS^1.2.3.4^ISO")
    assert (seg["OBR"][2], seg["OBR"][3]) == ("PL-R-1^EPIC", "FL-R-1^RIS^1.2.3.4^ISO")
    assert (seg["MSH"][10], seg["OBR"][4]) == ("P", "MSAI^MS MRI AI analysis^L")


def test_several_destinations_at_once_never_hit_the_scu_race(tmp_path: Path) -> None:
    """4 storescp peers x 100 MR slices of 128 KB, sent in parallel, one association each, 5 s DIMSE timeout:
    every C-STORE-RSP must reach its sender. Plain pynetdicom loses some to its reactor under this load
    (peer-baselines.md observation 5: "Received unexpected C-STORE service message", then a timeout)."""
    peers = [start_storescp(tmp_path / f"scp{i}") for i in range(4)]
    try:
        settings = make_settings(tmp_path / "home", "sqlite", pacs=[
            {"name": f"p{i}", "host": "127.0.0.1", "port": p.port, "ae_title": p.ae_title} for i, p in enumerate(peers)])
        store = open_store(settings)
        objects = [outbox.Rendered("out.sc", encode(ds)) for ds in flair_series(n=100, rows=256, cols=256, seed=2)]
        with store.db.session() as session:
            study = Study(study_uid_index="race")
            session.add(study)
            session.flush()
            job = Job(study_id=study.id, idem_key="race", state="done")  # type: ignore[arg-type]
            session.add(job)
            session.flush()
            outbox.enqueue(store, session, job_id=job.id, objects=objects)
        started = time.monotonic()
        outbox.run_once(store, outbox.Policy(batch=1000, dimse_timeout=5.0))
        elapsed = time.monotonic() - started
        with store.db.session() as session:
            entries = session.exec(select(OutboxEntry)).all()
        assert len(entries) == 400
        assert all(e.state == "delivered" and e.attempts == 1 for e in entries), \
            {e.last_error for e in entries if e.state != "delivered"}
        wait_until(lambda: all(len(p.files()) == 100 for p in peers), 20)
        assert elapsed < 90
        store.close()
    finally:
        for p in peers:
            p.stop()
