"""Envelope encryption: round trips, and a specific error for every kind of damage."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from msgate.errors import KeyNotFound, TamperedData, TruncatedData, WrongKey
from msgate.storage import crypto, keyring

CHUNK = 4096


@pytest.fixture
def ring() -> keyring.KeyRing:
    return keyring.generate()


def _seal(ring: keyring.KeyRing, data: bytes, blob_id: str = "b1", kind: str = "dicom") -> tuple[bytes, crypto.WrappedKey]:
    dek, wrapped = crypto.new_data_key(ring, blob_id=blob_id, kind=kind)
    return crypto.encrypt_bytes(dek, data, blob_id=blob_id, kind=kind, chunk_size=CHUNK), wrapped


def _open(ring: keyring.KeyRing, sealed: bytes, wrapped: crypto.WrappedKey, blob_id: str = "b1",
          kind: str = "dicom") -> bytes:
    dek = crypto.unwrap_key(ring, wrapped, blob_id=blob_id, kind=kind)
    return crypto.decrypt_bytes(dek, sealed, blob_id=blob_id, kind=kind)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 17])
def test_round_trip(ring: keyring.KeyRing, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    sealed, wrapped = _seal(ring, data)
    assert size < 64 or data[:64] not in sealed
    assert _open(ring, sealed, wrapped) == data


def test_flipped_byte_is_tampering(ring: keyring.KeyRing) -> None:
    sealed, wrapped = _seal(ring, b"x" * (3 * CHUNK))
    for position in (crypto.HEADER.size + 5, crypto.HEADER.size + CHUNK + 40, len(sealed) - 1):
        damaged = bytearray(sealed)
        damaged[position] ^= 0x01
        with pytest.raises(TamperedData):
            _open(ring, bytes(damaged), wrapped)


def test_header_damage_is_tampering(ring: keyring.KeyRing) -> None:
    sealed, wrapped = _seal(ring, b"y" * 100)
    with pytest.raises(TamperedData):
        _open(ring, b"XXXX" + sealed[4:], wrapped)


def test_truncation_is_named(ring: keyring.KeyRing) -> None:
    sealed, wrapped = _seal(ring, b"z" * (3 * CHUNK + 10))
    at_boundary = sealed[: crypto.HEADER.size + 2 * (CHUNK + crypto.TAG)]
    with pytest.raises(TruncatedData):
        _open(ring, at_boundary, wrapped)
    with pytest.raises(TruncatedData):
        _open(ring, sealed[: crypto.HEADER.size + 3], wrapped)
    with pytest.raises(TruncatedData):
        _open(ring, sealed[:10], wrapped)


def test_reordered_chunks_fail(ring: keyring.KeyRing) -> None:
    sealed, wrapped = _seal(ring, b"a" * CHUNK + b"b" * CHUNK + b"c" * 10)
    h, n = crypto.HEADER.size, CHUNK + crypto.TAG
    swapped = sealed[:h] + sealed[h + n : h + 2 * n] + sealed[h : h + n] + sealed[h + 2 * n :]
    with pytest.raises(TamperedData):
        _open(ring, swapped, wrapped)


def test_blob_moved_to_another_id_fails(ring: keyring.KeyRing) -> None:
    sealed, wrapped = _seal(ring, b"moved", blob_id="original")
    with pytest.raises(WrongKey):
        _open(ring, sealed, wrapped, blob_id="other")
    dek = crypto.unwrap_key(ring, wrapped, blob_id="original", kind="dicom")
    with pytest.raises(TamperedData):
        crypto.decrypt_bytes(dek, sealed, blob_id="other", kind="dicom")
    with pytest.raises(TamperedData):
        crypto.decrypt_bytes(dek, sealed, blob_id="original", kind="hl7")


def test_wrong_key_material_and_missing_key(ring: keyring.KeyRing) -> None:
    sealed, wrapped = _seal(ring, b"secret")
    impostor = keyring.KeyRing(keks=(keyring.Kek(id=ring.active_id, key=b"\x01" * 32, created=ring.active.created),),
                               active_id=ring.active_id, index_key=ring.index_key)
    with pytest.raises(WrongKey):
        _open(impostor, sealed, wrapped)
    with pytest.raises(KeyNotFound):
        _open(keyring.generate(), sealed, wrapped)


def test_rewrap_keeps_body_readable(ring: keyring.KeyRing) -> None:
    sealed, wrapped = _seal(ring, b"body")
    rotated = ring.with_new_kek()
    dek = crypto.unwrap_key(rotated, wrapped, blob_id="b1", kind="dicom")
    rewrapped = crypto.wrap_key(rotated.active, dek, blob_id="b1", kind="dicom")
    assert rewrapped.kek_id != wrapped.kek_id
    assert _open(rotated.without(ring.active_id), sealed, rewrapped) == b"body"


def test_streaming_memory_is_bounded(ring: keyring.KeyRing, tmp_path: Path) -> None:
    """256 MB through encrypt and decrypt with a 1 MiB chunk: peak Python memory stays near a few chunks."""
    size, chunk = 256 * 1024 * 1024, 1024 * 1024
    source = tmp_path / "big.bin"
    with source.open("wb") as f:
        f.truncate(size)
    dek, _ = crypto.new_data_key(ring, blob_id="big", kind="dicom")
    sealed = tmp_path / "big.enc"
    tracemalloc.start()
    with source.open("rb") as src, sealed.open("wb") as out:
        for piece in crypto.encrypt_stream(dek, src.read, blob_id="big", kind="dicom", chunk_size=chunk):
            out.write(piece)
    with sealed.open("rb") as src:
        total = sum(len(p) for p in crypto.decrypt_stream(dek, src.read, blob_id="big", kind="dicom"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == size
    assert peak < 16 * chunk, f"peak {peak / 1e6:.1f} MB"


def test_field_cipher_binds_column_and_indexes(ring: keyring.KeyRing) -> None:
    cipher = crypto.FieldCipher(ring, {"fk1": b"\x02" * 32}, "fk1")
    token = cipher.encrypt("DOE^JANE", column="patient.name")
    assert token is not None and b"DOE" not in token
    assert cipher.decrypt(token, column="patient.name") == "DOE^JANE"
    with pytest.raises(TamperedData):
        cipher.decrypt(token, column="patient.birth_date")
    assert cipher.encrypt(None, column="x") is None
    assert cipher.blind_index("123", scope="mrn") == cipher.blind_index(" 123 ", scope="mrn")
    assert cipher.blind_index("123", scope="mrn") != cipher.blind_index("123", scope="accession")
    other = crypto.FieldCipher(keyring.generate(), {"fk1": b"\x02" * 32}, "fk1")
    assert other.blind_index("123", scope="mrn") != cipher.blind_index("123", scope="mrn")
    with pytest.raises(KeyNotFound):
        crypto.FieldCipher(ring, {"fk2": b"\x03" * 32}, "fk2").decrypt(token, column="patient.name")
