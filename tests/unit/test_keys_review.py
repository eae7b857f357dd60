"""Key ring re-read by running processes: a ``keys rotate`` made elsewhere while a store is open.

Running roles kept the key ring they loaded at start; the rotation re-wrapped every data key under the
new KEK, so each blob read raised KeyNotFound until a restart (the outbox dead-lettered pending results,
workers failed queued jobs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from msgate.errors import KeyNotFound
from msgate.storage import crypto, keyring, rotation
from msgate.storage.models import Blob
from msgate.storage.store import Store, open_store
from tests.conftest import make_settings


def _rotate_elsewhere(store: Store, *, retire_old: bool = False) -> str:
    """What `msgate keys rotate` (and then `keys retire`) does in another process on the same home."""
    path = store.settings.keyring_path
    old = keyring.load(path).active_id
    with keyring.locked(path):
        keyring.save(keyring.load(path).with_new_kek(), path)
    other = open_store(store.settings)
    try:
        report = rotation.rotate(other)
        assert not report.remaining
    finally:
        other.close()
    if retire_old:
        with keyring.locked(path):
            keyring.save(keyring.load(path).without(old), path)
    return keyring.load(path).active_id


@pytest.mark.parametrize("retire_old", [False, True])
def test_a_store_opened_before_a_rotation_reads_blobs_and_fields_after_it(tmp_path: Path, retire_old: bool) -> None:
    store = open_store(make_settings(tmp_path / "home", "sqlite"))
    try:
        with store.db.session() as s:
            blob_id = store.blobs.put(s, kind="dicom", source=b"an acknowledged instance").id
        token = store.cipher.encrypt("PHITEST^ZELDA", column="study.patient_name")
        new_active = _rotate_elsewhere(store, retire_old=retire_old)
        with store.db.session() as s:
            assert store.blobs.read(s, blob_id) == b"an acknowledged instance"
        assert store.cipher.decrypt(token, column="study.patient_name") == "PHITEST^ZELDA"
        # the store, its blobs and its field cipher all use the re-read ring now: new data under the new KEK
        assert store.ring.active_id == store.blobs.ring.active_id == store.cipher.ring.active_id == new_active
        with store.db.session() as s:
            fresh = store.blobs.put(s, kind="dicom", source=b"after the rotation")
            assert fresh.kek_id == new_active
        with store.db.session() as s:
            assert store.blobs.read(s, fresh.id) == b"after the rotation"
    finally:
        store.close()


def test_a_key_absent_from_the_file_too_is_still_key_not_found(tmp_path: Path) -> None:
    store = open_store(make_settings(tmp_path / "home", "sqlite"))
    try:
        with store.db.session() as s:
            blob = store.blobs.put(s, kind="dicom", source=b"x")
            blob_id = blob.id
        with store.db.session() as s:
            row = s.get(Blob, blob_id)
            assert row is not None
            row.kek_id = "kek-never-made"
            s.add(row)
        with store.db.session() as s, pytest.raises(KeyNotFound, match="kek-never-made"):
            store.blobs.read(s, blob_id)
    finally:
        store.close()


def test_unwrap_finds_a_kek_added_to_the_file_since_the_ring_was_loaded(tmp_path: Path) -> None:
    """Callers that unwrap with a ring they hold (journal segments, CKKS secret key files) re-read too."""
    path = tmp_path / "keys" / "keyring.json"
    keyring.init(path)
    loaded = keyring.load(path)
    rotated = loaded.with_new_kek()
    keyring.save(rotated, path)
    dek, wrapped = crypto.new_data_key(rotated, blob_id="seg1", kind="journal")
    assert not loaded.has(wrapped.kek_id)
    assert crypto.unwrap_key(loaded, wrapped, blob_id="seg1", kind="journal") == dek
    assert keyring.newer(keyring.load(path)) is None  # an unchanged file is not read again


def test_a_file_with_another_index_key_is_not_taken(tmp_path: Path) -> None:
    """Another installation's key ring copied over this one would change every blind index: refused."""
    path = tmp_path / "keys" / "keyring.json"
    keyring.init(path)
    loaded = keyring.load(path)
    stranger = keyring.generate()
    keyring.save(stranger, path)
    _, wrapped = crypto.new_data_key(stranger, blob_id="b", kind="dicom")
    assert keyring.newer(loaded) is None
    with pytest.raises(KeyNotFound):
        crypto.unwrap_key(loaded, wrapped, blob_id="b", kind="dicom")
