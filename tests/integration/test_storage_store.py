"""The store on both backends: blobs, ingest idempotency, tamper detection, concurrency, retention."""

from __future__ import annotations

import threading
import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import col, func, select

from msgate.errors import Rejected, TamperedData, Transient, TruncatedData
from msgate.storage import audit, retention
from msgate.storage.ingest import Hl7Header
from msgate.storage.models import Blob, Hl7Message, Instance, Series, Study, utcnow
from msgate.storage.store import Store, open_store
from tests.dicom_factory import mr_slice

pytestmark = pytest.mark.integration


def test_blob_round_trip_many_chunks(store: Store) -> None:
    store.blobs.chunk_bytes = 4096
    data = bytes(range(256)) * 100
    with store.db.session() as s:
        blob = store.blobs.put(s, kind="result", source=data)
    with store.db.session() as s:
        assert store.blobs.read(s, blob.id) == data
        row = s.get(Blob, blob.id)
        assert row is not None and row.size == len(data) and row.kek_id == store.ring.active_id
    if store.settings.storage.blob_backend == "local":
        assert not list(store.settings.blob_dir.rglob("*.tmp"))


@pytest.mark.postgres
def test_postgres_blob_streams_in_bounded_memory(tmp_path: Path, pg_url: str) -> None:
    """The local backend is covered by test_crypto's 256 MB stream."""
    from msgate.storage import keyring
    from tests.conftest import make_settings

    keyring.init(tmp_path / "keys" / "keyring.json")
    store = open_store(make_settings(tmp_path, "postgres", pg_url))
    size = 48 * 1024 * 1024
    source = store.settings.home / "big.bin"
    with source.open("wb") as f:
        f.truncate(size)
    tracemalloc.start()
    with store.db.session() as s:
        blob = store.blobs.put(s, kind="dicom", source=source)
    with store.db.session() as s:
        total = sum(len(piece) for piece in store.blobs.open(s, blob.id))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == size and peak < 20 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


def test_instance_ingest_is_idempotent_and_versions_changes(store: Store) -> None:
    uids = {"study_uid": "1.2.826.0.1.3680043.8.498.2", "series_uid": "1.2.826.0.1.3680043.8.498.3"}
    raw = mr_slice(sop_uid="1.2.826.0.1.3680043.8.498.1", seed=1, **uids)
    first = store.ingest.store_instance(source=raw, calling_aet="PACS")
    again = store.ingest.store_instance(source=raw, calling_aet="PACS")
    assert not first.duplicate and again.duplicate and again.instance_id == first.instance_id
    changed = mr_slice(sop_uid="1.2.826.0.1.3680043.8.498.1", seed=2, **uids)
    second = store.ingest.store_instance(source=changed, calling_aet="PACS")
    assert second.version == 2 and not second.duplicate
    with store.db.session() as s:
        rows = s.exec(select(Instance).order_by(col(Instance.version))).all()
        assert [(r.version, r.current) for r in rows] == [(1, False), (2, True)]
        assert store.blobs.read(s, rows[0].blob_id) == raw and store.blobs.read(s, rows[1].blob_id) == changed
        series = s.exec(select(Series)).one()
        assert series.instance_count == 1
        kinds = [e.kind for e in audit.tail(s, 10)]
        assert kinds.count("ingest.instance") == 2


def test_bad_datasets_are_rejected_without_harm(store: Store) -> None:
    good = mr_slice()
    store.ingest.store_instance(source=good)
    with pytest.raises(Rejected) as err:
        store.ingest.store_instance(source=b"\x00garbage" * 50)
    assert err.value.code in {"undecodable", "missing_SOPInstanceUID"}
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(good))
    del ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(Rejected, match="SOPInstanceUID"):
        store.ingest.store_instance(source=buf.getvalue())
    with store.db.session() as s:
        assert s.exec(select(func.count()).select_from(Instance)).one() == 1


def test_disk_floor_is_transient(store: Store) -> None:
    store.ingest.min_free_bytes = 1 << 60
    with pytest.raises(Transient) as err:
        store.ingest.store_instance(source=mr_slice())
    assert err.value.code == "disk_floor"


def test_hl7_dedup_and_group_commit(store: Store) -> None:
    h = lambda cid: Hl7Header(control_id=cid, sending_application="LIS", sending_facility="H1",  # noqa: E731
                              message_type="ORU", trigger="R01", version="2.5.1")
    batch = store.ingest.store_hl7_batch([(b"MSH|1", h("1")), (b"MSH|2", h("2")), (b"MSH|1again", h("1"))])
    assert [m.duplicate for m in batch] == [False, False, True] and batch[0].message_id == batch[2].message_id
    other_app = Hl7Header(control_id="1", sending_application="ADT", sending_facility="H1")
    assert not store.ingest.store_hl7(raw=b"MSH|x", header=other_app).duplicate
    with store.db.session() as s:
        assert s.exec(select(func.count()).select_from(Hl7Message)).one() == 3
        msg = s.get(Hl7Message, batch[0].message_id)
        assert msg is not None and store.blobs.read(s, msg.blob_id) == b"MSH|1" and msg.duplicates == 1


def _tamper(store: Store, sql: str) -> audit.Verification:
    with store.db.session() as s:
        s.exec(text(sql))  # type: ignore[call-overload]
    with store.db.session() as s:
        return audit.verify(s)


@pytest.mark.parametrize("sql,bad_seq", [
    ("UPDATE audit_event SET actor = 'mallory' WHERE seq = 3", 3),
    ("DELETE FROM audit_event WHERE seq = 2", 2),
    ("DELETE FROM audit_event WHERE seq = 5", 5),
    ("UPDATE audit_event SET seq = 100 WHERE seq = 2; UPDATE audit_event SET seq = 2 WHERE seq = 3;"
     " UPDATE audit_event SET seq = 3 WHERE seq = 100", 2),
])
def test_audit_detects_tampering(store: Store, sql: str, bad_seq: int) -> None:
    for i in range(5):
        store.ingest.store_instance(source=mr_slice(index=i))
    with store.db.session() as s:
        assert audit.verify(s).ok and audit.verify(s).checked == 5
    result = None
    for statement in sql.split(";"):
        if statement.strip():
            result = _tamper(store, statement)
    assert result is not None and not result.ok and result.first_bad_seq == bad_seq, result


def test_concurrent_ingest_keeps_chain_and_counts(store: Store) -> None:
    study = "1.2.826.0.1.3680043.8.498.77"
    series = "1.2.826.0.1.3680043.8.498.78"
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for i in range(8):
                store.ingest.store_instance(source=mr_slice(study_uid=study, series_uid=series, index=offset * 8 + i))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with store.db.session() as s:
        assert s.exec(select(func.count()).select_from(Study)).one() == 1
        assert s.exec(select(Series)).one().instance_count == 32
        assert audit.verify(s).ok and audit.verify(s).checked == 32


def test_rotation_rewraps_and_old_key_can_be_retired(settings, store: Store) -> None:  # type: ignore[no-untyped-def]
    from msgate.storage import keyring, rotation

    raws = [mr_slice(index=i) for i in range(3)]
    for raw in raws:
        store.ingest.store_instance(source=raw)
    old_id = store.ring.active_id
    keyring.save(store.ring.with_new_kek(), settings.keyring_path)
    rotated = open_store(settings)
    report = rotation.rotate(rotated)
    assert report.rewrapped_blobs == 3 and report.rewrapped_keys == 1 and not report.remaining
    keyring.save(keyring.load(settings.keyring_path).without(old_id), settings.keyring_path)
    fresh = open_store(settings)
    with fresh.db.session() as s:
        blobs = s.exec(select(Instance.blob_id)).all()
        assert sorted(fresh.blobs.read(s, b) for b in blobs) == sorted(raws)
        study = s.exec(select(Study)).first()
        assert study is not None
        assert fresh.cipher.decrypt(study.patient_name_enc, column="study.patient_name") == "PHITEST^ZELDA"
        assert audit.verify(s).ok


def _delivered(store: Store, study_id: int, when: object, state: str = "ready") -> None:
    """Mark a study delivered at ``when``, its instances received the day before."""
    with store.db.session() as s:
        study = s.get(Study, study_id)
        assert study is not None
        study.delivered_at, study.state = when, state
        s.add(study)
        for inst in s.exec(select(Instance).where(Instance.study_id == study_id)).all():
            inst.received_at = when - timedelta(days=1)  # type: ignore[operator]
            s.add(inst)


def test_retention_purges_bodies_keeps_rows(store: Store) -> None:
    stored = store.ingest.store_instance(source=mr_slice())
    store.ingest.store_instance(source=mr_slice())  # another study, not delivered
    _delivered(store, stored.study_id, utcnow() - timedelta(days=store.settings.storage.retention_days + 1))
    dry = retention.purge(store, dry_run=True)
    assert dry.studies == [stored.study_id] and dry.blobs == 1
    report = retention.purge(store)
    assert report.studies == [stored.study_id] and report.by_age == 1
    with store.db.session() as s:
        inst = s.get(Instance, stored.instance_id)
        assert inst is not None
        with pytest.raises(TruncatedData, match="purged"):
            store.blobs.read(s, inst.blob_id)
        assert s.exec(select(func.count()).select_from(Instance)).one() == 2
        assert audit.verify(s).ok and audit.tail(s, 1)[0].kind == "retention.purge"
    assert retention.purge(store).studies == []


def test_retention_by_free_space_only_where_purging_frees_it(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the free-space floor, the local backend purges delivered studies oldest first; PostgreSQL
    blob bodies live on the database's disk, and measuring MSGATE_HOME purged every study on its delivery
    day there, whatever retention_days said."""
    stored = store.ingest.store_instance(source=mr_slice())
    _delivered(store, stored.study_id, utcnow() - timedelta(hours=1))  # well inside retention_days
    monkeypatch.setattr(store.settings.storage, "purge_free_bytes", 1 << 62)  # always under the floor
    report = retention.purge(store, dry_run=True)
    if store.settings.storage.blob_backend == "local":
        assert report.studies == [stored.study_id] and report.by_space == 1
    else:
        assert report.studies == [] and report.by_space == 0


def test_retention_keeps_a_study_with_a_run_after_its_delivery(store: Store) -> None:
    """New instances reopened a delivered study (and a new run follows): its bodies used to be purged on
    the old delivery date, under the new run. Kept while it receives, while that run is pending, and
    purged again once the run has ended."""
    from msgate.storage.models import Job

    stored = store.ingest.store_instance(source=mr_slice())
    old = utcnow() - timedelta(days=store.settings.storage.retention_days + 1)
    _delivered(store, stored.study_id, old, "receiving")  # reopened by a new instance
    assert retention.purge(store, dry_run=True).studies == []
    with store.db.session() as s:
        study = s.get(Study, stored.study_id)
        assert study is not None
        study.state = "ready"
        s.add(study)
        s.add(Job(id="run2", study_id=stored.study_id, idem_key="run2", state="queued"))
    assert retention.purge(store, dry_run=True).studies == []  # the new run has not delivered yet
    with store.db.session() as s:
        job = s.get(Job, "run2")
        assert job is not None
        job.state = "failed"
        s.add(job)
    assert retention.purge(store, dry_run=True).studies == [stored.study_id]
    with store.db.session() as s:  # `jobs retry` re-queues an old job: it keeps its created_at (before delivery)
        s.add(Job(id="old", study_id=stored.study_id, idem_key="old", state="queued", created_at=old))
    assert retention.purge(store, dry_run=True).studies == []


def test_retention_never_purges_an_instance_acknowledged_after_the_candidates_were_listed(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener commits a new instance of a delivered study before it reopens the study: a purge
    that listed the study just before must not delete that acknowledged instance's body."""
    from pydicom.uid import generate_uid

    study_uid = generate_uid()
    first = store.ingest.store_instance(source=mr_slice(study_uid=study_uid))
    _delivered(store, first.study_id, utcnow() - timedelta(days=store.settings.storage.retention_days + 1))
    late: list[int] = []
    purge_study = retention._purge_study

    def racing(st: Store, study_id: int, dry_run: bool) -> int | None:
        late.append(store.ingest.store_instance(source=mr_slice(study_uid=study_uid, index=1)).instance_id)
        return purge_study(st, study_id, dry_run)

    monkeypatch.setattr(retention, "_purge_study", racing)
    assert retention.purge(store).studies == []  # no longer eligible once the instance is in
    with store.db.session() as s:
        for instance_id in (first.instance_id, *late):
            inst = s.get(Instance, instance_id)
            assert inst is not None and store.blobs.read(s, inst.blob_id)
        assert s.get(Study, first.study_id).purged_at is None  # type: ignore[union-attr]


def test_tampered_blob_file_is_detected(tmp_path: Path) -> None:
    """File-level tampering of the local backend; PostgreSQL rows are covered by test_crypto."""
    from tests.conftest import make_settings

    store = open_store(make_settings(tmp_path, "sqlite"))
    stored = store.ingest.store_instance(source=mr_slice())
    with store.db.session() as s:
        inst = s.get(Instance, stored.instance_id)
        assert inst is not None
        path: Path = store.blobs.bodies.path(inst.blob_id)  # type: ignore[attr-defined]
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(TamperedData):
            store.blobs.read(s, inst.blob_id)


def test_a_batch_with_an_instance_twice_counts_it_once(store: Store) -> None:
    """The listener's indexer sends a batch at a time; a sender's retry can put one instance in it twice."""
    from msgate.listener.dataset import parse
    from msgate.storage.ingest import Received

    uids = {"study_uid": "1.2.826.0.1.3680043.8.498.91", "series_uid": "1.2.826.0.1.3680043.8.498.92"}
    a = mr_slice(sop_uid="1.2.826.0.1.3680043.8.498.93", seed=1, **uids)
    b = mr_slice(sop_uid="1.2.826.0.1.3680043.8.498.94", seed=2, **uids)
    results = store.ingest.index_received([Received(raw, parse(raw), "PACS", None) for raw in (a, b, a)])
    assert [getattr(r, "duplicate", r) for r in results] == [False, False, True]
    with store.db.session() as s:
        assert s.exec(select(Series)).one().instance_count == 2
        assert s.exec(select(Study)).one().instance_count == 2
        assert s.exec(select(func.count()).select_from(Instance)).one() == 2


def test_series_count_the_frames_of_multiframe_instances(store: Store, tmp_path: Path) -> None:
    """A 3D FLAIR sent as one Enhanced MR instance of 8 frames beats a 3-slice 2D FLAIR of the same study
    when the FLAIR series is chosen (by instance count it lost, 1 to 3)."""
    from dicom_helpers import write_enhanced_mr, write_series
    from pydicom.uid import generate_uid

    from msgate.workers.case import choose_series

    study_uid = generate_uid()
    enhanced = write_enhanced_mr(tmp_path / "e.dcm", frames=8, study_uid=study_uid)
    for path in [enhanced, *write_series(tmp_path / "s", count=3, study_uid=study_uid), enhanced]:
        store.ingest.store_instance(source=path.read_bytes(), calling_aet="PACS")  # the last: a duplicate
    with store.db.session() as s:
        rows = list(s.exec(select(Series)).all())
        assert sorted((r.instance_count, r.frame_count) for r in rows) == [(1, 8), (3, 3)]
        for row in rows:
            row.role = "FLAIR"
        assert choose_series(rows)["FLAIR"].frame_count == 8


@pytest.mark.postgres
def test_audit_verify_is_not_fooled_by_an_append_that_commits_while_it_runs(tmp_path: Path, pg_url: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL (read committed) verify read the records, then the head: an append committed in
    between made an intact chain report 'records after seq N were deleted' (2-9 of 20 runs under load)."""
    from sqlmodel import Session

    from msgate.storage import keyring
    from msgate.storage.models import AuditHead
    from tests.conftest import make_settings

    keyring.init(tmp_path / "home" / "keys" / "keyring.json")
    store = open_store(make_settings(tmp_path / "home", "postgres", pg_url))
    try:
        with store.db.session() as s:
            for i in range(3):
                audit.append(s, kind="test", actor="t", subject=f"x{i}")
        real_get = Session.get

        def get(session: Session, model: object, ident: object, **kw: object) -> object:
            if model is AuditHead:  # another writer commits just now
                with store.db.session() as other:
                    audit.append(other, kind="test", actor="t", subject="late")
            return real_get(session, model, ident, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(Session, "get", get)
        with store.db.session() as s:
            result = audit.verify(s)
        monkeypatch.undo()
        assert result.ok, result
        with store.db.session() as s:
            assert audit.verify(s).ok
    finally:
        store.close()


def test_a_commit_that_raised_but_committed_keeps_its_body(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection drops during COMMIT but the server committed: the listener answers a failure, the
    sender resends and finds the row as a duplicate. The group-commit path discarded the body on the
    error, so that instance's row pointed to a deleted body."""
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session as OrmSession

    from msgate.storage.index_dicom import BatchIndexer

    from tests.conftest import make_settings

    store = open_store(make_settings(tmp_path / "home", "sqlite"))  # file bodies, written outside the transaction
    assert store.ingest.can_group_commit
    real_commit, real_run = OrmSession.commit, BatchIndexer.run
    failed: list[bool] = []

    def run(self: BatchIndexer, *args: object, **kwargs: object) -> object:
        self.session.info["indexed"] = True
        return real_run(self, *args, **kwargs)  # type: ignore[arg-type]

    def commit_then_fail(self: OrmSession) -> None:
        indexed = self.info.get("indexed", False)
        real_commit(self)
        if indexed and not failed:  # the transaction that indexed the instance committed, then "dropped"
            failed.append(True)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    raw = mr_slice()
    monkeypatch.setattr(BatchIndexer, "run", run)
    monkeypatch.setattr(OrmSession, "commit", commit_then_fail)
    prepared = store.ingest.prepare_instance(source=raw, calling_aet="PACS")
    assert isinstance(store.ingest.commit_instances([prepared])[0], Transient)  # answered as a failure
    monkeypatch.undo()
    again = store.ingest.store_instance(source=raw, calling_aet="PACS")  # the sender's resend
    assert again.duplicate
    with store.db.session() as s:
        inst = s.get(Instance, again.instance_id)
        assert inst is not None and store.blobs.read(s, inst.blob_id) == raw
    store.close()


def test_a_message_stored_before_the_content_key_is_still_a_duplicate(store: Store) -> None:
    """Rows stored before 2026-12-07 carry the old duplicate key (sender and MSH-10 only): their resend,
    or a journal replay after the upgrade, was stored and mapped a second time. A message that reuses
    such a row's MSH-10 with other content is still a new message."""
    raw = (b"MSH|^~\\&|LAB|HOSP|MSGATE|MSGATE|20250101120000||ORU^R01^ORU_R01|C0001|P|2.5.1\r"
           b"PID|1||M1^^^HOSP^MR||DOE^JANE||19800101|F\r")
    header = Hl7Header(control_id="C0001", sending_application="LAB", sending_facility="HOSP")
    first = store.ingest.store_hl7(raw=raw, header=header)
    with store.db.session() as s:  # as the earlier release indexed it
        row = s.get(Hl7Message, first.message_id)
        assert row is not None
        row.dedup_index = store.ingest.legacy_key(header)
    resend = store.ingest.store_hl7(raw=raw.replace(b"20250101120000", b"20250101120500", 1), header=header)
    assert resend.duplicate and resend.message_id == first.message_id
    other = store.ingest.store_hl7(raw=raw.replace(b"DOE^JANE", b"ROE^RICHARD"), header=header)
    assert not other.duplicate


@pytest.mark.postgres
def test_roles_starting_together_share_one_field_key(tmp_path: Path, pg_url: str) -> None:
    """compose starts every role at once after `migrate`: each made its own PHI field key, and a role could
    not decrypt what another wrote (KeyNotFound)."""
    from sqlalchemy import text

    from msgate.storage import keyring
    from msgate.storage.db import Database
    from msgate.storage.store import field_cipher

    ring = keyring.init(tmp_path / "keys" / "keyring.json")
    Database(pg_url).upgrade()
    barrier, ciphers, errors = threading.Barrier(6), [], []

    def role() -> None:
        db = Database(pg_url)
        try:
            barrier.wait()
            ciphers.append(field_cipher(db, ring))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=role) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(ciphers) == 6
    assert len({c.active for c in ciphers}) == 1
    token = ciphers[0].encrypt("DOE^JANE", column="study.patient_name")
    assert all(c.decrypt(token, column="study.patient_name") == "DOE^JANE" for c in ciphers)
    db = Database(pg_url)
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM data_key WHERE purpose = 'field'")).scalar() == 1
    db.dispose()


@pytest.mark.postgres
def test_roles_started_together_on_a_fresh_postgresql_database_all_migrate(pg_url: str, tmp_path: Path) -> None:
    """Every process migrates at start; on PostgreSQL two at once raced to create the same tables and one
    exited with "unexpected IntegrityError". The migration now takes an advisory lock."""
    import os
    import subprocess
    import sys

    from msgate.storage import keyring

    keyring.init(tmp_path / "home" / "keys" / "keyring.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    env.update({"MSGATE_HOME": str(tmp_path / "home"), "MSGATE_DATABASE_URL": pg_url,
                "MSGATE_STORAGE__MIN_FREE_BYTES": "0"})
    procs = [subprocess.Popen([sys.executable, "-m", "msgate", "db", "upgrade"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outcomes = [(p.wait(120), p.stderr.read() if p.stderr else "") for p in procs]
    assert all(code == 0 for code, _ in outcomes), outcomes
