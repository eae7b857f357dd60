"""Purge on both backends: the data key is erased with the body, rotation leaves purged blobs alone,
and an instance sent again after its purge is stored again (it used to be dropped as a duplicate)."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import col, select

from msgate.errors import CryptoError, TruncatedData
from msgate.listener.dataset import parse
from msgate.storage import audit, crypto, keyring, retention, rotation
from msgate.storage.index_dicom import BatchIndexer, PreparedInstance
from msgate.storage.ingest import Received, content_hash, read_header
from msgate.storage.models import Blob, Instance, Series, Study, utcnow
from msgate.storage.store import Store, open_store
from tests.dicom_factory import mr_slice

pytestmark = pytest.mark.integration


def _purged_study(store: Store, raws: list[bytes]) -> int:
    """Ingest ``raws`` (one study), deliver it long ago and purge it; returns the study id."""
    stored = [store.ingest.store_instance(source=raw, calling_aet="PACS") for raw in raws]
    when = utcnow() - timedelta(days=store.settings.storage.retention_days + 1)
    with store.db.session() as s:
        study = s.get(Study, stored[0].study_id)
        assert study is not None
        study.delivered_at, study.state = when, "ready"
        s.add(study)
        for inst in s.exec(select(Instance).where(Instance.study_id == study.id)).all():
            inst.received_at = when - timedelta(days=1)
            s.add(inst)
    assert retention.purge(store).studies == [stored[0].study_id]
    return stored[0].study_id


def _study_raws(n: int = 2) -> list[bytes]:
    uids = {"study_uid": "1.2.826.0.1.3680043.8.498.71", "series_uid": "1.2.826.0.1.3680043.8.498.72"}
    return [mr_slice(sop_uid=f"1.2.826.0.1.3680043.8.498.7{3 + i}", index=i, seed=i, **uids) for i in range(n)]


def test_purge_erases_the_data_key_so_a_backup_copy_cannot_be_decrypted(store: Store, tmp_path: Path) -> None:
    raw = _study_raws(1)[0]
    stored = store.ingest.store_instance(source=raw)
    backup: Path | None = None
    with store.db.session() as s:
        inst = s.get(Instance, stored.instance_id)
        assert inst is not None
        blob_id = inst.blob_id
    if store.blobs.bodies.name == "local":  # the nightly backup of MSGATE_HOME/blobs
        backup = tmp_path / "backup-of-one-blob"
        shutil.copy(store.blobs.bodies.path(blob_id), backup)  # type: ignore[attr-defined]
    with store.db.session() as s:
        study = s.get(Study, stored.study_id)
        assert study is not None
        when = utcnow() - timedelta(days=store.settings.storage.retention_days + 1)
        study.delivered_at, study.state = when, "ready"
        s.add(study)
        inst = s.get(Instance, stored.instance_id)
        assert inst is not None
        inst.received_at = when - timedelta(days=1)
        s.add(inst)
    assert retention.purge(store).blobs == 1
    with store.db.session() as s:
        blob = s.get(Blob, blob_id)
        assert blob is not None and blob.purged_at is not None
        assert blob.wrapped_dek == b""  # the row stays (audit, trace); the key is gone
        with pytest.raises(TruncatedData, match="purged"):
            store.blobs.read(s, blob_id)
        with pytest.raises(TruncatedData, match="purged"):
            store.blobs._dek(blob)
        assert audit.verify(s).ok
    if backup is not None:  # the backup copy no longer decrypts with today's key ring
        with pytest.raises(CryptoError):
            dek = crypto.unwrap_key(store.ring, crypto.WrappedKey(blob.kek_id, blob.wrapped_dek), blob_id=blob_id,
                                    kind="dicom")
            crypto.decrypt_bytes(dek, backup.read_bytes(), blob_id=blob_id, kind="dicom")


def test_rotation_skips_purged_blobs_and_the_old_kek_retires(store: Store) -> None:
    _purged_study(store, _study_raws(2))
    kept = store.ingest.store_instance(source=mr_slice())  # another study, not purged
    old = store.ring.active_id
    with store.db.session() as s:  # a purge made before crypto-shredding left its key in the row
        legacy = s.exec(select(Blob).where(col(Blob.purged_at).is_not(None))).first()
        assert legacy is not None
        dek = crypto.new_data_key(store.ring, blob_id=legacy.id, kind=legacy.kind)[1]
        legacy.wrapped_dek = dek.wrapped
        s.add(legacy)
        assert rotation.key_usage(s)[old] == 2  # one live blob + the field key; purged blobs not counted
    path = store.settings.keyring_path
    keyring.save(keyring.load(path).with_new_kek(), path)
    rotated = open_store(store.settings)
    try:
        report = rotation.rotate(rotated)
        assert report.rewrapped_blobs == 1 and report.shredded == 1 and not report.remaining
        with rotated.db.session() as s:
            purged = s.exec(select(Blob).where(col(Blob.purged_at).is_not(None))).all()
            assert len(purged) == 2 and all(b.wrapped_dek == b"" for b in purged)
            assert old not in rotation.key_usage(s)
        keyring.save(keyring.load(path).without(old), path)
        fresh = open_store(store.settings)
        with fresh.db.session() as s:
            inst = s.get(Instance, kept.instance_id)
            assert inst is not None and fresh.blobs.read(s, inst.blob_id)
        fresh.close()
    finally:
        rotated.close()


def _readable_current(store: Store, study_id: int) -> list[bytes]:
    with store.db.session() as s:
        rows = s.exec(select(Instance).where(Instance.study_id == study_id, col(Instance.current).is_(True))
                      .order_by(col(Instance.instance_number))).all()
        return [store.blobs.read(s, r.blob_id) for r in rows]


def test_an_instance_sent_again_after_its_purge_is_stored_again(store: Store) -> None:
    """The PACS re-sends a purged study: every instance used to be acknowledged as a duplicate of its
    bodiless copy, nothing stored, nothing audited, no run."""
    raws = _study_raws(2)
    study_id = _purged_study(store, raws)
    results = []
    for raw in raws:  # the indexer's own path on both backends (the body written in the index transaction)
        with store.db.session() as s:
            blob = store.blobs.write_body(s, kind="dicom", source=raw)
            item = PreparedInstance(read_header(raw), blob, store.cipher.blind_index(
                read_header(raw).get("SOPInstanceUID"), scope="sop"), content_hash(store.cipher, raw), "PACS", "a2")
            done, dropped = BatchIndexer(s, store.cipher).run([item], actor="listener")
            assert dropped == []
            results.extend(done)
    assert [(r.duplicate, r.version) for r in results] == [(False, 2), (False, 2)]
    assert _readable_current(store, study_id) == raws
    with store.db.session() as s:
        study = s.get(Study, study_id)
        assert study is not None and study.purged_at is None  # retention purges the new bodies again later
        assert study.instance_count == 2 and s.exec(select(Series)).one().instance_count == 2
        assert [e.kind for e in audit.tail(s, 3)] == ["retention.purge", "ingest.instance", "ingest.instance"]
    again = store.ingest.store_instance(source=raws[0], calling_aet="PACS")  # now a real duplicate
    assert again.duplicate and again.version == 2


def test_the_listener_path_stores_a_purged_instance_again(tmp_path: Path) -> None:
    """The group-commit path the DICOM listener takes with file bodies (the reviewer's storescu re-send)."""
    from tests.conftest import make_settings

    store = open_store(make_settings(tmp_path / "home", "sqlite"))
    try:
        raws = _study_raws(2)
        study_id = _purged_study(store, raws)
        results = store.ingest.index_received([Received(raw, parse(raw), "PACS", "assoc-2") for raw in raws])
        assert [getattr(r, "duplicate", r) for r in results] == [False, False]
        assert _readable_current(store, study_id) == raws
        replay = store.ingest.index_received([Received(raws[0], parse(raws[0]), "PACS", "assoc-2")])
        assert getattr(replay[0], "duplicate", None) is True  # the journal replaying that delivery
    finally:
        store.close()


def test_a_journal_replay_of_the_purged_delivery_stays_a_duplicate(tmp_path: Path) -> None:
    """A record of the very association that delivered the purged version is a replay, not a re-send."""
    from tests.conftest import make_settings

    store = open_store(make_settings(tmp_path / "home", "sqlite"))
    try:
        raw = _study_raws(1)[0]
        first = store.ingest.index_received([Received(raw, parse(raw), "PACS", "assoc-1")])[0]
        with store.db.session() as s:
            study = s.get(Study, first.study_id)  # type: ignore[union-attr]
            assert study is not None
            when = utcnow() - timedelta(days=store.settings.storage.retention_days + 1)
            study.delivered_at, study.state = when, "ready"
            s.add(study)
            for inst in s.exec(select(Instance)).all():
                inst.received_at = when - timedelta(days=1)
                s.add(inst)
        assert retention.purge(store).blobs == 1
        replay = store.ingest.index_received([Received(raw, parse(raw), "PACS", "assoc-1")])[0]
        assert getattr(replay, "duplicate", None) is True
    finally:
        store.close()


def test_store_instance_stores_a_purged_instance_again(store: Store) -> None:
    """The direct path (PostgreSQL bodies, `store_instance`): its fast duplicate check compared only the
    content hash and answered a resend of a purged instance as a duplicate of its bodiless copy."""
    raws = _study_raws(2)
    study_id = _purged_study(store, raws)
    results = [store.ingest.store_instance(source=raw, calling_aet="PACS") for raw in raws]
    assert [(r.duplicate, r.version) for r in results] == [(False, 2), (False, 2)]
    assert _readable_current(store, study_id) == raws
