"""Retention of studies with no result to deliver (review 2, #2).

A router that forwards every modality sends CT, CR, US and MR without a FLAIR: those studies end
``stored`` or ``stable`` and never get ``delivered_at``. Retention used to purge delivered studies only, so
they were kept forever, free space reached the floor and every C-STORE was refused. Now a finished study
with nothing to deliver is purged ``storage.unused_retention_days`` (default: ``retention_days``) after its
last instance, and first under the free-space floor; a study with a run to come or a result still in the
outbox is never purged."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from dicom_helpers import opened_store, running_listener, storescu, write_series
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlmodel import col, select

from msgate.errors import TruncatedData
from msgate.storage import audit, repo_studies, retention
from msgate.storage.models import AuditEvent, Instance, Job, OutboxEntry, Study, utcnow
from msgate.storage.store import Store
from tests.dicom_factory import mr_slice

pytestmark = [pytest.mark.integration]

OLD_DAYS = 400.0


def _ct_series(folder: Path, count: int) -> list[Path]:
    """A synthetic CT head series (CT Image Storage): the default routing stores it only."""
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for index in range(count):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, generate_uid()
        ds.PatientName, ds.PatientID, ds.AccessionNumber = "SYNTH^ROUTER", "MRN-SYN-CT", "ACC-SYN-CT"
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19800101", "M", "20261101", "090000"
        ds.Modality, ds.BodyPartExamined, ds.SeriesDescription, ds.SeriesNumber = "CT", "HEAD", "AX HEAD", 2
        ds.InstanceNumber, ds.ImagePositionPatient = index + 1, [0.0, 0.0, float(index)]
        ds.ImageOrientationPatient, ds.PixelSpacing, ds.SliceThickness = [1, 0, 0, 0, 1, 0], [0.5, 0.5], 1.0
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = bytes(range(256)) * 2
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"ct_{index:03d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _wait_states(home: Path, want: dict[str, str], timeout: float) -> dict[str, Study]:
    """Study by accession once each has its wanted state."""
    deadline = time.monotonic() + timeout
    while True:
        with opened_store(home) as store, store.db.session() as s:
            rows = s.exec(select(Study)).all()
            got = {store.cipher.decrypt(r.accession_enc, column="study.accession") or "": r for r in rows}
        if {acc: r.state for acc, r in got.items()} == want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _age(store: Store, study_id: int, days: float) -> None:
    """The study's last instance (and readiness) ``days`` ago."""
    when = utcnow() - timedelta(days=days)
    with store.db.session() as s:
        study = s.get(Study, study_id)
        assert study is not None
        study.last_received_at = when
        study.ready_at = when if study.ready_at is not None else None
        s.add(study)


def _bodies_purged(store: Store, study_id: int) -> list[bool]:
    with store.db.session() as s:
        out = []
        for inst in s.exec(select(Instance).where(Instance.study_id == study_id)).all():
            try:
                store.blobs.read(s, inst.blob_id)
                out.append(False)
            except TruncatedData:
                out.append(True)
        return out


def _purged_at(store: Store, study_id: int) -> object:
    with store.db.session() as s:
        study = s.get(Study, study_id)
        assert study is not None
        return study.purged_at


@pytest.mark.peer
def test_studies_from_a_router_are_purged_and_a_study_waiting_for_its_run_is_not(tmp_path: Path) -> None:
    """Through the real listener (DCMTK storescu): a CT study ends ``stored``, an MR study without a FLAIR
    ``stable``; aged past retention, both are purged (bodies, ``purged_at``, audit). A ``ready`` study with a
    queued job is kept, and purged once its only job has failed (nothing left to deliver)."""
    ct = _ct_series(tmp_path / "ct", 3)
    t1 = write_series(tmp_path / "t1", count=3, description="T1 MPRAGE", scanning=("GR", "IR"),
                      inversion_time=900.0)
    flair = write_series(tmp_path / "flair", count=3, description="AX FLAIR")
    import pydicom

    for files, accession in ((t1, "ACC-SYN-T1"), (flair, "ACC-SYN-FLAIR")):  # one study each
        for path in files:
            ds = pydicom.dcmread(path)
            ds.AccessionNumber = accession
            ds.save_as(path, enforce_file_format=True)
    with running_listener(tmp_path, MSGATE_DICOM__QUIET_SECONDS="2") as listener:
        for files in (ct, t1, flair):
            sent = storescu(listener.port, files)
            assert sent.returncode == 0, sent.stderr
        want = {"ACC-SYN-CT": "stored", "ACC-SYN-T1": "stable", "ACC-SYN-FLAIR": "ready"}
        studies = _wait_states(listener.home, want, timeout=30)
        assert {a: s.state for a, s in studies.items()} == want, listener.log()[-4000:]
    ids = {acc: int(s.id) for acc, s in studies.items()}  # type: ignore[arg-type]
    with opened_store(listener.home) as store:
        with store.db.session() as s:
            s.add(Job(id="waiting", study_id=ids["ACC-SYN-FLAIR"], idem_key="waiting", state="queued"))
        for study_id in ids.values():
            _age(store, study_id, OLD_DAYS)
        report = retention.purge(store)
        assert sorted(report.studies) == sorted([ids["ACC-SYN-CT"], ids["ACC-SYN-T1"]])
        assert report.unused == 2 and report.by_age == 2 and report.blobs == 6
        for acc in ("ACC-SYN-CT", "ACC-SYN-T1"):
            assert _bodies_purged(store, ids[acc]) == [True] * 3
            assert _purged_at(store, ids[acc]) is not None
        assert _bodies_purged(store, ids["ACC-SYN-FLAIR"]) == [False] * 3  # its run needs them
        assert _purged_at(store, ids["ACC-SYN-FLAIR"]) is None
        with store.db.session() as s:
            events = s.exec(select(AuditEvent).where(AuditEvent.kind == "retention.purge")
                            .order_by(col(AuditEvent.seq))).all()
            assert sorted(e.subject for e in events) == sorted(f"study:{ids[a]}" for a in ("ACC-SYN-CT", "ACC-SYN-T1"))
            assert all(e.detail["policy"] == "unused" and e.detail["blobs"] == 3 for e in events)
            assert audit.verify(s).ok
            job = s.get(Job, "waiting")
            assert job is not None
            job.state = "failed"
            s.add(job)
        assert retention.purge(store).studies == [ids["ACC-SYN-FLAIR"]]
        assert _bodies_purged(store, ids["ACC-SYN-FLAIR"]) == [True] * 3
        assert retention.purge(store).studies == []


# --- the rule, on both backends ------------------------------------------------------------------


def _finished(store: Store, state: str, *, days: float = OLD_DAYS, count: int = 1) -> int:
    """A study of ``count`` instances that the tracker finished as ``state``, its last instance ``days`` ago."""
    uid = generate_uid()
    stored = [store.ingest.store_instance(source=mr_slice(study_uid=uid, index=i), calling_aet="ROUTER")
              for i in range(count)]
    study_id = stored[0].study_id
    if state != "receiving":
        with store.db.session() as s:
            repo_studies.finish(s, study_id=study_id, state=state, reason="released", roles=[], missing=[])
    _age(store, study_id, days)
    return study_id


def _job(store: Store, study_id: int, state: str, *, entry: str | None = None) -> None:
    with store.db.session() as s:
        job = Job(study_id=study_id, idem_key=generate_uid(), state=state)
        s.add(job)
        s.flush()
        if entry is not None:
            oru = store.blobs.put(s, kind="out.oru", source=b"MSH|^~\\&|MSGATE|HOSP|ENGINE|HOSP|||ORU^R01|1|P|2.5.1\r")
            s.flush()
            s.add(OutboxEntry(job_id=job.id, kind="hl7", destination="hl7", blob_id=oru.id, state=entry))


def test_only_finished_studies_with_nothing_to_deliver_are_purged(store: Store) -> None:
    purged = {
        "stored": _finished(store, "stored"),
        "ignored": _finished(store, "ignored"),
        "stable": _finished(store, "stable"),
    }
    cancelled = _finished(store, "ready")
    _job(store, cancelled, "cancelled")
    failed = _finished(store, "ready")
    _job(store, failed, "superseded")
    _job(store, failed, "failed")
    purged.update({"ready, job cancelled": cancelled, "ready, jobs superseded and failed": failed})

    kept = {"receiving": _finished(store, "receiving"), "ready, no job yet": _finished(store, "ready"),
            "stable, inside retention": _finished(store, "stable", days=1)}
    for label, job_state, entry in (("ready, job queued", "queued", None), ("ready, job running", "running", None),
                                    ("ready, job done, not delivered", "done", None),
                                    ("ready, job done, ORU pending", "done", "pending"),
                                    ("ready, job failed, a dead letter", "failed", "dead")):
        kept[label] = _finished(store, "ready")
        _job(store, kept[label], job_state, entry=entry)
    in_window = _finished(store, "ready")  # the scheduler may still plan it again (EHR change)
    _job(store, in_window, "failed")
    with store.db.session() as s:
        study = s.get(Study, in_window)
        assert study is not None
        study.ready_at = utcnow() - timedelta(minutes=5)
        s.add(study)
    kept["ready, inside the scheduler's planning window"] = in_window

    dry = retention.purge(store, dry_run=True)
    assert sorted(dry.studies) == sorted(purged.values()) and all(_purged_at(store, i) is None for i in purged.values())
    report = retention.purge(store)
    assert sorted(report.studies) == sorted(purged.values()), {
        label: i in report.studies for label, i in {**purged, **kept}.items()}
    assert report.unused == len(purged) and report.by_age == len(purged)
    for label, study_id in kept.items():
        assert _purged_at(store, study_id) is None, label
        assert _bodies_purged(store, study_id) == [False], label
    assert retention.purge(store).studies == []


def test_unused_studies_have_their_own_retention_and_go_first_under_the_floor(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store.settings.storage, "unused_retention_days", 2.0)
    old_ct = _finished(store, "stored", days=3)  # past the unused retention, inside retention_days
    recent_ct = _finished(store, "stored", days=1)
    assert retention.purge(store).studies == [old_ct]
    delivered = _finished(store, "ready", days=1)
    _job(store, delivered, "done", entry="delivered")
    with store.db.session() as s:  # its result delivered just now
        study = s.get(Study, delivered)
        assert study is not None
        study.delivered_at = utcnow()
        s.add(study)
        for inst in s.exec(select(Instance).where(Instance.study_id == delivered)).all():
            inst.received_at = utcnow() - timedelta(days=1)
            s.add(inst)
    monkeypatch.setattr(store.settings.storage, "purge_free_bytes", 1 << 62)  # always under the floor
    report = retention.purge(store, dry_run=True)
    if store.settings.storage.blob_backend == "local":  # a study with nothing to deliver goes first
        assert report.studies == [recent_ct, delivered] and report.by_space == 2 and report.unused == 1
    else:  # PostgreSQL bodies: the space is the database's (only the age policy applies)
        assert report.studies == []


def test_an_instance_stored_after_the_decision_is_never_purged(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener commits an instance before it reopens the study (after a crash: at its next start), so
    a ``stored`` state can predate an instance: that instance's body is kept until the study is decided
    again."""
    monkeypatch.setattr(store.settings.storage, "unused_retention_days", 0.0)
    uid = generate_uid()
    first = store.ingest.store_instance(source=mr_slice(study_uid=uid), calling_aet="ROUTER")
    with store.db.session() as s:
        repo_studies.finish(s, study_id=first.study_id, state="stored", reason="released", roles=[], missing=[])
    late = store.ingest.store_instance(source=mr_slice(study_uid=uid, index=1), calling_aet="ROUTER")
    assert late.study_id == first.study_id
    assert retention.purge(store).studies == []
    assert _bodies_purged(store, first.study_id) == [False, False]
    with store.db.session() as s:  # the tracker reopens it and decides again
        assert repo_studies.reopen(s, study_id=first.study_id)
        repo_studies.finish(s, study_id=first.study_id, state="stored", reason="quiet", roles=[], missing=[])
    assert retention.purge(store).studies == [first.study_id]
    assert _bodies_purged(store, first.study_id) == [True, True]


def test_an_instance_arriving_while_the_purge_runs_is_never_purged(store: Store,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Listed, then an instance is acknowledged (and the study reopened and decided again) before the
    purge takes the study's lock: the purge skips it."""
    study_id = _finished(store, "stored")
    listed = retention._unused_candidates

    def racing(*args: object) -> object:
        rows = listed(*args)  # type: ignore[arg-type]
        raw = mr_slice(study_uid=_study_uid(store, study_id), index=5)
        store.ingest.store_instance(source=raw, calling_aet="ROUTER")
        with store.db.session() as s:
            repo_studies.reopen(s, study_id=study_id)
            repo_studies.finish(s, study_id=study_id, state="stored", reason="quiet", roles=[], missing=[])
        return rows

    monkeypatch.setattr(retention, "_unused_candidates", racing)
    assert retention.purge(store).studies == []
    assert _bodies_purged(store, study_id) == [False, False]


def _study_uid(store: Store, study_id: int) -> str:
    with store.db.session() as s:
        first = s.exec(select(Instance).where(Instance.study_id == study_id)).first()
        assert first is not None
        raw = store.blobs.read(s, first.blob_id)
    import io

    import pydicom

    return str(pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True).StudyInstanceUID)


def test_an_operator_purges_one_study_now_and_never_one_with_a_run_to_come(tmp_path: Path) -> None:
    """``msgate db purge --study ID``: a study sent by mistake (or a full disk) need not wait for retention;
    the purge is audited with the operator's name. A study still needed is refused, with the reason."""
    from typer.testing import CliRunner

    from msgate.cli.app import app
    from msgate.storage.store import open_store
    from tests.conftest import make_settings

    store = open_store(make_settings(tmp_path / "home", "sqlite"))
    try:
        recent = _finished(store, "stored", days=0.01)  # well inside retention
        waiting = _finished(store, "ready")
        _job(store, waiting, "queued")
        env = {"MSGATE_HOME": str(store.settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0", "COLUMNS": "250"}
        runner = CliRunner()

        def cli(*args: str) -> tuple[int, str]:
            result = runner.invoke(app, ["db", "purge", *args], env=env)
            return result.exit_code, " ".join(result.output.split())

        code, out = cli("--study", str(waiting))
        assert code == 1 and f"study {waiting} is not purgeable now" in out
        assert cli("--study", "999999") == (1, "error: no study 999999")
        assert cli("--study", str(recent), "--dry-run") == (0, f"would purge study {recent}: 1 blobs, 0 engine texts")
        assert _bodies_purged(store, recent) == [False]
        assert cli("--study", str(recent)) == (0, f"purged study {recent}: 1 blobs, 0 engine texts")
        assert _bodies_purged(store, recent) == [True] and _bodies_purged(store, waiting) == [False]
        assert cli("--study", str(recent)) == (1, f"error: study {recent} is already purged")
        with store.db.session() as s:
            event = audit.tail(s, 1)[0]
            assert (event.kind, event.subject, event.detail["policy"]) == ("retention.purge", f"study:{recent}",
                                                                           "unused")
            assert event.actor.startswith("cli:") and audit.verify(s).ok
        code, out = cli("--dry-run")
        assert code == 0 and "would purge 0 studies (0 with no result to deliver)" in out
    finally:
        store.close()
