"""A new version that only re-encodes the version it replaces keeps the change check's identity.

``reencoded.compare`` on pairs of real encodings (pydicom's RLE, pyjpegls' JPEG-LS, OpenJPEG's JPEG 2000,
deflate, implicit VR, Pillow's JPEG baseline); ``reencoded.settle`` and the scheduler's key on the embedded
SQLite store and the machine's PostgreSQL (row bodies); migration 0005 on both.
"""

from __future__ import annotations

import copy
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite
from pydicom.uid import (JPEG2000, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, JPEGLSNearLossless, MRImageStorage,
                         RLELossless, generate_uid)
from sqlmodel import col, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

import test_workers_double as double  # noqa: E402
from conftest import make_settings  # noqa: E402

from msgate.storage import keyring, reencoded  # noqa: E402
from msgate.storage.models import AuditEvent, Blob, Instance, Job, Series  # noqa: E402
from msgate.storage.store import Store, open_store  # noqa: E402
from msgate.workers.celery_app import build_app  # noqa: E402
from msgate.workers.scheduler import Scheduler, series_hash  # noqa: E402

WORKERS = {"model_module": "test_workers_double", "ehr_deadline_seconds": 0, "required_ehr_fields": []}
COMPRESSED = {RLELossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000}


def _mr(*, frames: int = 1, rows: int = 64, cols: int = 48, seed: int = 3) -> Dataset:
    """A synthetic MR data set (no patient data), explicit VR little endian, with private elements."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.SeriesDescription = "SYNTH^REENC", "MRN-RE-1", "MR", "AX FLAIR"
    ds.InstanceNumber, ds.ImagePositionPatient = 1, [0.0, 0.0, 1.0]
    ds.ImageOrientationPatient, ds.PixelSpacing = [1, 0, 0, 0, 1, 0], [1.0, 1.0]
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    block = ds.private_block(0x0029, "SYNTH VENDOR 1.0", create=True)
    block.add_new(0x10, "LO", "private text")
    block.add_new(0x11, "US", 7)
    pixels = np.random.default_rng(seed).integers(0, 4000, (frames, rows, cols), dtype=np.uint16)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = (pixels if frames > 1 else pixels[0]).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian, **options: object) -> bytes:
    """``ds`` in ``syntax``, as a sender would store it (the SOP Instance UID kept)."""
    ds = copy.deepcopy(ds)
    if syntax in COMPRESSED:
        ds.compress(syntax, generate_instance_uid=False, **options)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return buf.getvalue()


def _with_pixel(ds: Dataset, frame: int, value_delta: int = 1) -> Dataset:
    out = copy.deepcopy(ds)
    arr = out.pixel_array.copy()
    flat = arr.reshape(-1, arr.shape[-2], arr.shape[-1])
    flat[frame, 5, 7] = (int(flat[frame, 5, 7]) + value_delta) % 4000
    out.PixelData = arr.tobytes()
    return out


# --- compare: pure -----------------------------------------------------------------------------------

@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian,
                                    ImplicitVRLittleEndian])
def test_a_lossless_re_encoding_is_the_same_data_set(syntax: str) -> None:
    ds = _mr()
    new = _encode(ds, syntax)
    assert dcmread(io.BytesIO(new)).file_meta.TransferSyntaxUID == syntax and new != _encode(ds)
    assert reencoded.compare(_encode(ds), new) == (True, "reencoded")
    assert reencoded.compare(new, _encode(ds)) == (True, "reencoded")  # decompressed by a router: the same too


def test_a_multi_frame_object_is_compared_frame_by_frame() -> None:
    ds = _mr(frames=5)
    assert reencoded.compare(_encode(ds), _encode(ds, RLELossless)) == (True, "reencoded")
    assert reencoded.compare(_encode(ds), _encode(_with_pixel(ds, 3), RLELossless)) == (False, "pixels")


def test_other_file_meta_is_not_a_change() -> None:
    """A router re-sends with its own implementation class and source AE title (group 0002)."""
    ds = _mr()
    other = copy.deepcopy(ds)
    other.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    other.file_meta.SourceApplicationEntityTitle = "ROUTER"
    assert reencoded.compare(_encode(ds), _encode(other, JPEGLSLossless)) == (True, "reencoded")


@pytest.mark.parametrize(("syntax", "options"), [(JPEGLSNearLossless, {"jls_error": 2}),
                                                 (JPEG2000, {"j2k_cr": [20]})])
def test_a_lossy_re_encoding_is_a_change(syntax: str, options: dict[str, object]) -> None:
    ds = _mr()
    assert reencoded.compare(_encode(ds), _encode(ds, syntax, **options)) == (False, "pixels")


def test_a_lossy_only_transfer_syntax_is_a_change_without_decoding() -> None:
    """JPEG baseline (Pillow's encoder, 8-bit): never the exact values, so not compared further."""
    from PIL import Image

    ds = _mr()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    pixels = np.random.default_rng(1).integers(0, 255, (ds.Rows, ds.Columns), dtype=np.uint8)
    ds.PixelData = pixels.tobytes()
    jpeg = copy.deepcopy(ds)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    jpeg.PixelData = encapsulate([buf.getvalue()])
    jpeg["PixelData"].VR = "OB"
    jpeg.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    out = io.BytesIO()
    dcmwrite(out, jpeg, enforce_file_format=True)
    assert reencoded.compare(_encode(ds), out.getvalue()) == (False, "lossy")


def test_one_pixel_or_one_element_changed_is_a_change() -> None:
    ds = _mr()
    assert reencoded.compare(_encode(ds), _encode(_with_pixel(ds, 0), RLELossless)) == (False, "pixels")
    for change in ({"WindowCenter": "400"}, {"PatientID": "MRN-RE-2"}, {"PhotometricInterpretation": "MONOCHROME1"},
                   {"SeriesDescription": "AX FLAIR 2"}):
        other = copy.deepcopy(ds)
        for keyword, value in change.items():
            setattr(other, keyword, value)
        assert reencoded.compare(_encode(ds), _encode(other, JPEGLSLossless)) == (False, "elements"), change
    private = copy.deepcopy(ds)
    private.private_block(0x0029, "SYNTH VENDOR 1.0")[0x11].value = 8
    assert reencoded.compare(_encode(ds), _encode(private, ImplicitVRLittleEndian)) == (False, "elements")


def test_bodies_that_cannot_be_read_or_decoded_are_changes_not_errors() -> None:
    ds = _mr()
    rle = bytearray(_encode(ds, RLELossless))
    cut = bytes(rle[: len(rle) - 200])  # the RLE fragment truncated
    assert reencoded.compare(_encode(ds), cut)[0] is False
    damaged = bytes(rle[:-60]) + b"\x00" * 60  # the end of the fragment zeroed: decodes to garbage or fails
    assert reencoded.compare(_encode(ds), damaged)[0] is False
    assert reencoded.compare(_encode(ds), b"not dicom at all") == (False, "unreadable")
    assert reencoded.compare(b"", _encode(ds, RLELossless)) == (False, "unreadable")


# --- settle and the scheduler's key, on both storage setups ------------------------------------------

@pytest.fixture
def sched_store(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Iterator[Store]:
    home = tmp_path / "home"
    pg = None
    if backend == "postgres":
        pg = request.getfixturevalue("pg_url")
        keyring.init(home / "keys" / "keyring.json")
    store = open_store(make_settings(home, backend, pg, workers=WORKERS))
    yield store
    store.close()


def _current(store: Store, study_id: int) -> list[Instance]:
    with store.db.session() as session:
        return list(session.exec(select(Instance).where(Instance.study_id == study_id, col(Instance.current).is_(True))
                                 .order_by(col(Instance.instance_number))).all())


def _resend(store: Store, study_id: int, syntax: str, *, change_slice: int | None = None) -> list[int]:
    """Every current instance of the study again in ``syntax`` (one pixel changed in one slice); new ids."""
    ids = []
    for n, row in enumerate(_current(store, study_id)):
        with store.db.session() as session:
            ds = dcmread(io.BytesIO(store.blobs.read(session, row.blob_id)))
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress(generate_instance_uid=False)
        if n == change_slice:
            ds = _with_pixel(ds, 0)
        stored = store.ingest.store_instance(source=_encode(ds, syntax), calling_aet="ROUTER")
        assert not stored.duplicate and stored.version > 1
        ids.append(stored.instance_id)
    return ids


def _series_hash(store: Store, study_id: int) -> str:
    with store.db.session() as session:
        series = session.exec(select(Series).where(Series.study_id == study_id)).one()
        return series_hash(session, {"FLAIR": series})


def _events(store: Store, kind: str) -> list[AuditEvent]:
    with store.db.session() as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.kind == kind).order_by(col(AuditEvent.seq))).all())


def test_a_re_encoded_version_keeps_the_identity_and_a_changed_one_does_not(sched_store: Store) -> None:
    store = sched_store
    study_id, _ = double.make_study(store, seed=21, slices=4)
    first = _current(store, study_id)
    key = _series_hash(store, study_id)
    assert reencoded.settle(store, [r.id for r in first if r.id is not None]) == []  # first versions: nothing to do

    rle = _resend(store, study_id, RLELossless)
    assert _series_hash(store, study_id) != key  # not decided yet: a change, as before this check existed
    decided = reencoded.settle(store, rle)
    assert [(d.equivalent, d.reason, d.version) for d in decided] == [(True, "reencoded", 2)] * 4
    assert _series_hash(store, study_id) == key
    assert {r.change_hash for r in _current(store, study_id)} == {r.content_hash for r in first}
    assert reencoded.settle(store, rle) == []  # decided once

    jls = _resend(store, study_id, JPEGLSLossless)  # a re-encoding of a re-encoding keeps the first identity
    assert [d.reason for d in reencoded.settle(store, jls)] == ["reencoded"] * 4
    assert _series_hash(store, study_id) == key

    changed = _resend(store, study_id, RLELossless, change_slice=2)
    decisions = reencoded.settle(store, changed)
    assert sorted(d.reason for d in decisions) == ["pixels", "reencoded", "reencoded", "reencoded"]
    assert _series_hash(store, study_id) != key
    with store.db.session() as session:
        row = session.get(Instance, next(d.instance_id for d in decisions if not d.equivalent))
        assert row is not None and row.change_hash == row.content_hash

    reencodings, changes = _events(store, "instance.reencoded"), _events(store, "instance.changed")
    assert (len(reencodings), len(changes)) == (11, 1)
    assert changes[0].detail == {"previous": changes[0].detail["previous"], "version": 4, "reason": "pixels",
                                 "from_transfer_syntax": JPEGLSLossless, "to_transfer_syntax": RLELossless}
    assert reencodings[0].actor == "indexer" and reencodings[0].subject.startswith("instance:")
    text = repr([(e.subject, e.detail) for e in reencodings + changes])
    assert "DOUBLE" not in text and "MRN" not in text  # no name, no identifier


def test_the_scheduler_plans_no_second_job_for_a_re_encoded_study(sched_store: Store) -> None:
    store = sched_store
    sched = Scheduler(store, build_app(store.settings))
    study_id, _ = double.make_study(store, seed=22, slices=4)
    [first] = sched.scan()
    reencoded.settle(store, _resend(store, study_id, JPEGLSLossless))
    double.mark_ready(store, study_id)  # the listener's tracker, after the re-send
    assert sched.scan() == []
    reencoded.settle(store, _resend(store, study_id, RLELossless, change_slice=0))
    double.mark_ready(store, study_id)
    [second] = sched.scan()
    with store.db.session() as session:
        old, new = session.get(Job, first), session.get(Job, second)
        assert old is not None and new is not None
        assert (old.state, new.supersedes_id) == ("superseded", first)


def test_a_purged_or_undecodable_previous_body_is_a_change(sched_store: Store) -> None:
    store = sched_store
    study_id, _ = double.make_study(store, seed=23, slices=2)
    first = _current(store, study_id)
    with store.db.session() as session:
        bodies = [dcmread(io.BytesIO(store.blobs.read(session, row.blob_id))) for row in first]
        blob = session.get(Blob, first[0].blob_id)
        assert blob is not None
        store.blobs.purge(session, blob)  # what retention does to a delivered study's source images
    purged = store.ingest.store_instance(source=_encode(bodies[0], RLELossless), calling_aet="PACS")
    broken = bodies[1]
    broken.PixelData = broken.PixelData[:10]  # a body whose pixel data no longer decode
    cut = store.ingest.store_instance(source=_encode(broken), calling_aet="PACS")
    decisions = {d.instance_id: d for d in reencoded.settle(store, [purged.instance_id, cut.instance_id])}
    assert decisions[purged.instance_id].reason == "unreadable"  # purged: not known to be the same
    assert decisions[cut.instance_id].reason == "undecodable"
    with store.db.session() as session:
        for instance_id in decisions:
            row = session.get(Instance, instance_id)
            assert row is not None and row.current and row.change_hash == row.content_hash  # kept, and a change


def test_a_failure_to_decide_leaves_the_version_undecided_never_raises(sched_store: Store,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store = sched_store
    study_id, _ = double.make_study(store, seed=24, slices=2)
    key = _series_hash(store, study_id)
    ids = _resend(store, study_id, RLELossless)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("database gone")

    monkeypatch.setattr(reencoded, "_record", boom)
    assert reencoded.settle(store, ids) == []
    assert _series_hash(store, study_id) != key  # undecided: runs again, as before
    monkeypatch.undo()
    assert len(reencoded.settle(store, ids)) == 2 and _series_hash(store, study_id) == key


def _downgrade(store: Store, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    from msgate.storage.db import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with store.db.connect() as conn, conn.begin():
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def test_migration_0005_counts_earlier_versions_as_changed(sched_store: Store) -> None:
    """Versions received before the column existed were never compared: each stays a change (the keys of
    their jobs are unchanged); first versions stay NULL (their content hash)."""
    store = sched_store
    study_id, _ = double.make_study(store, seed=25, slices=2)
    key = _series_hash(store, study_id)
    _resend(store, study_id, RLELossless)
    changed_key = _series_hash(store, study_id)
    _downgrade(store, "0004")  # the column dropped: the schema before this revision
    assert store.db.current_revision() == "0004"
    store.db.upgrade("0005")
    assert store.db.current_revision() == "0005"
    with store.db.session() as session:
        rows = session.exec(select(Instance).where(Instance.study_id == study_id)).all()
        assert {(r.version, r.change_hash == r.content_hash if r.version > 1 else r.change_hash) for r in rows} == \
            {(1, None), (2, True)}
    assert _series_hash(store, study_id) == changed_key != key
