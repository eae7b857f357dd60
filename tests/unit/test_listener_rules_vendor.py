"""Roles and routes the tracker decides from what vendors and PACS send: a key object ahead of the images,
GE's exam-level ProtocolName on every series. Driven through the real Tracker on both storage setups."""

from __future__ import annotations

import io
import threading
import time
import uuid

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlmodel import select

from msgate.listener.tracking import Tracker
from msgate.storage.ingest import read_header
from msgate.storage.models import Series, Study
from msgate.storage.store import Store

MR = "1.2.840.10008.5.1.4.1.1.4"
NON_IMAGE = {"KO": "1.2.840.10008.5.1.4.1.1.88.59", "SR": "1.2.840.10008.5.1.4.1.1.88.22",
             "PR": "1.2.840.10008.5.1.4.1.1.11.1"}


def _encode(study_uid: str, series_uid: str, k: int, *, description: str, protocol: str = "",
            modality: str = "MR", sop_class: str = MR, number: int = 1) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.AccessionNumber, ds.StudyDescription = "P1", "A1", "MRI BRAIN"
    ds.Modality, ds.SeriesDescription, ds.ProtocolName = modality, description, protocol or description
    ds.BodyPartExamined, ds.SeriesNumber, ds.InstanceNumber = "HEAD", number, k + 1
    if sop_class == MR:
        ds.ScanningSequence, ds.InversionTime, ds.ImageType = ["SE", "IR"], 2500.0, ["ORIGINAL", "PRIMARY"]
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(k)], [1.0, 0, 0, 0, 1.0, 0]
        ds.PixelSpacing, ds.SliceThickness, ds.Rows, ds.Columns = [1.0, 1.0], 1.0, 4, 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.full((4, 4), k + 1, np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _send(store: Store, tracker: Tracker | None, datas: list[bytes]) -> None:
    """What the listener's indexer does per instance, then the association's release."""
    assoc = uuid.uuid4().hex
    for data in datas:
        header = read_header(data)
        stored = store.ingest.store_instance(source=data, calling_aet="PACS", assoc_id=assoc, header=header)
        if tracker is not None:
            tracker.instance_stored(stored, header, assoc_id=assoc, calling_aet="PACS")
    if tracker is not None:
        tracker.association_ended(assoc, released=True)


def _finished(store: Store, tracker: Tracker) -> Study:
    """Run the tracker's thread until the one study has left ``receiving`` (at most 10 s)."""
    stop = threading.Event()
    thread = threading.Thread(target=tracker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            with store.db.session() as session:
                study = session.exec(select(Study)).one()
            if study.state != "receiving" or time.monotonic() > deadline:
                return study
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(timeout=5)


@pytest.mark.parametrize("first", ["KO", "SR", "PR"])
def test_an_mr_study_whose_key_object_arrived_first_goes_to_the_pipeline(store: Store, first: str) -> None:
    """The route came from the first modality received, so an MR study whose KO / SR / PR the PACS sent
    ahead of the images was ``store_only`` and never ran."""
    tracker = Tracker(store, quiet_seconds=30, rules=store.settings.rules)
    study_uid = generate_uid()
    key = _encode(study_uid, generate_uid(), 0, description="key images", modality=first,
                  sop_class=NON_IMAGE[first], number=99)
    flair = generate_uid()
    _send(store, tracker, [key, *(_encode(study_uid, flair, k, description="Ax T2 FLAIR") for k in range(3))])
    study = _finished(store, tracker)
    assert study.modalities.split(",")[0] == first  # the case itself: the non-image modality came first
    assert (study.route, study.state) == ("pipeline", "ready")


def test_a_study_without_images_routes_on_its_first_modality(store: Store) -> None:
    tracker = Tracker(store, quiet_seconds=30, rules=store.settings.rules)
    study_uid = generate_uid()
    _send(store, tracker, [_encode(study_uid, generate_uid(), 0, description="key images", modality="KO",
                                   sop_class=NON_IMAGE["KO"])])
    study = _finished(store, tracker)
    assert (study.route, study.state) == ("store_only", "stored")


def test_roles_from_index_rows_read_the_description_before_the_protocol(store: Store) -> None:
    """A series whose role was never written is classified from its row at readiness; its description and
    protocol were joined there too, so GE's "Ax T2 FLAIR" in an "MS BRAIN SWAN" exam was SWI."""
    study_uid, flair, swan = generate_uid(), generate_uid(), generate_uid()
    _send(store, None, [*(_encode(study_uid, flair, k, description="Ax T2 FLAIR", protocol="MS BRAIN SWAN",
                                  number=5) for k in range(3)),
                        *(_encode(study_uid, swan, k, description="Ax SWAN", protocol="MS BRAIN SWAN",
                                  number=8) for k in range(3))])
    with store.db.session() as session:
        assert [s.role for s in session.exec(select(Series)).all()] == [None, None]  # as after a crash
    tracker = Tracker(store, quiet_seconds=0.2, rules=store.settings.rules)
    tracker.load_open()  # what a restart does: the open study is decided after the quiet period
    study = _finished(store, tracker)
    with store.db.session() as session:
        roles = sorted((s.series_number, s.role) for s in session.exec(select(Series)).all())
    assert roles == [(5, "FLAIR"), (8, "SWI")]
    assert (study.route, study.state) == ("pipeline", "ready")
