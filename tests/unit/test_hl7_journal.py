"""The commit journal: records round-trip encrypted, a torn tail is dropped, tampering is detected."""

from __future__ import annotations

from pathlib import Path

import pytest

from msgate.errors import TamperedData
from msgate.storage.journal import Journal, read_segment
from msgate.storage import keyring


def test_journal_roundtrip_torn_tail_and_tamper(tmp_path: Path) -> None:
    ring = keyring.generate()
    journal = Journal(tmp_path / "j", ring)
    name = journal.append([b"MSH|one\r", b"MSH|two\r"])
    journal.append([b"MSH|three\r"])
    path = tmp_path / "j" / name
    assert b"MSH|one" not in path.read_bytes()  # encrypted at rest
    assert read_segment(path, ring) == [b"MSH|one\r", b"MSH|two\r", b"MSH|three\r"]
    data = path.read_bytes()
    path.write_bytes(data[:-5])  # crash while writing the last record
    assert read_segment(path, ring) == [b"MSH|one\r", b"MSH|two\r"]
    flipped = bytearray(data)
    flipped[-3] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(TamperedData):
        read_segment(path, ring)


def test_fully_indexed_segment_is_deleted_on_close(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", keyring.generate())
    name = journal.append([b"MSH|a\r"])
    journal.indexed(name, 1)
    journal.close()
    assert list((tmp_path / "j").iterdir()) == []
