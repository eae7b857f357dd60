"""The commit journal: records round-trip encrypted, a torn tail is dropped, tampering is detected."""

from __future__ import annotations

from pathlib import Path

import pytest

from msgate.errors import TamperedData
from msgate.storage import keyring
from msgate.storage.journal import Journal, read_segment


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


@pytest.mark.parametrize("preallocate", [False, True])
@pytest.mark.parametrize("written", [0, 10])  # nothing written, or a short write before the error
def test_a_failed_append_spoils_no_later_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                preallocate: bool, written: int) -> None:
    """A write or flush error (ENOSPC, EIO) refuses that call's records (0xA700 / AE) but must leave every
    acknowledged record readable. Appending behind the torn bytes used to make the next acknowledged
    record fail authentication, so recovery stopped on TamperedData at the next start."""
    import errno
    import os

    from msgate.storage import journal as journal_mod

    ring = keyring.generate()
    journal = Journal(tmp_path / "j", ring, rotate_bytes=1 << 20, preallocate=preallocate)
    journal.start()
    first = journal.append([b"MSH|acknowledged-1\r"])
    real_write = os.write

    def failing(fd: int, data: bytes) -> int:
        monkeypatch.setattr(journal_mod.os, "write", real_write)
        if written:
            real_write(fd, bytes(data)[:written])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_mod.os, "write", failing)
    with pytest.raises(OSError):
        journal.append([b"MSH|refused\r"])
    second = journal.append([b"MSH|acknowledged-2\r"])
    assert second != first  # a fresh segment after the failure
    records = [r for p in sorted((tmp_path / "j").glob("*.jnl"), key=lambda p: p.name != first)
               for r in read_segment(p, ring)]
    assert records == [b"MSH|acknowledged-1\r", b"MSH|acknowledged-2\r"]
    journal.indexed(first, 1)  # the failed segment goes once its acknowledged records are indexed
    assert not (tmp_path / "j" / first).exists()
    journal.close()


def test_fully_indexed_segment_is_deleted_on_close(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", keyring.generate())
    name = journal.append([b"MSH|a\r"])
    journal.indexed(name, 1)
    journal.close()
    assert list((tmp_path / "j").iterdir()) == []


def test_segment_reader_follows_a_segment_being_appended(tmp_path: Path) -> None:
    from msgate.hl7.segments import SegmentReader

    ring = keyring.generate()
    journal = Journal(tmp_path / "j", ring)
    name = journal.append([b"MSH|%d\r" % i for i in range(1, 6)])
    reader = SegmentReader(tmp_path / "j" / name, ring)
    assert reader.read(5, limit=2) == [(1, b"MSH|1\r"), (2, b"MSH|2\r")]
    assert [seq for seq, _ in reader.read(4)] == [3, 4]  # no further than announced durable
    assert [seq for seq, _ in reader.read(4)] == []
    big = b"MSH|" + bytes(3 << 20)  # larger than one read
    journal.append([big, b"MSH|7\r"])
    assert reader.read() == [(5, b"MSH|5\r"), (6, big), (7, b"MSH|7\r")]
    path = tmp_path / "j" / name
    with path.open("ab") as handle:  # a record being written: not returned until it is complete
        handle.write(b"\x00\x00\x00\x40" + b"x" * 10)
    assert reader.read() == []
    journal.close()


def test_segment_reader_without_header_or_with_forged_record(tmp_path: Path) -> None:
    from msgate.hl7.segments import SegmentReader

    ring = keyring.generate()
    (tmp_path / "torn.jnl").write_bytes(b"MGJ1\x00")  # crash while the segment was created
    assert SegmentReader(tmp_path / "torn.jnl", ring).read() == []
    journal = Journal(tmp_path / "j", ring)
    path = tmp_path / "j" / journal.append([b"MSH|one\r", b"MSH|two\r"])
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    reader = SegmentReader(path, ring)
    with pytest.raises(TamperedData):
        reader.read()


def test_segment_reader_zero_filled_segment_and_its_torn_last_record(tmp_path: Path) -> None:
    from msgate.hl7.segments import SegmentReader

    ring = keyring.generate()
    journal = Journal(tmp_path / "j", ring, rotate_bytes=1 << 16, preallocate=True)
    name = journal.append([b"MSH|one\r", b"MSH|two\r"])
    path = tmp_path / "j" / name
    assert SegmentReader(path, ring).read() == [(1, b"MSH|one\r"), (2, b"MSH|two\r")]  # zeros end it
    data = bytearray(path.read_bytes())
    last = data.index(b"\x00" * 64) - 1
    data[last] ^= 1  # the last record's tag torn by a crash; zeros follow it
    path.write_bytes(bytes(data))
    assert SegmentReader(path, ring).read() == [(1, b"MSH|one\r")]
    journal.close()


def test_a_segment_whose_header_was_cut_short_holds_no_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash or ENOSPC while a segment was made left a short header: recovery raised struct.error and
    the listener could not start until someone deleted the file. A short write now fails the segment
    (and its append) and removes the file."""
    import errno
    import os

    ring = keyring.init(tmp_path / "keys" / "keyring.json")
    journal = Journal(tmp_path / "j", ring)
    journal.append([b"acknowledged"])
    segment = next((tmp_path / "j").glob("*.jnl"))
    full = segment.read_bytes()
    for cut in (5, 20, 34):
        segment.write_bytes(full[:cut])
        assert read_segment(segment, ring) == []
    writes = iter([3])

    def short_write(fd: int, data: bytes) -> int:
        n = next(writes, None)
        if n is None:
            raise OSError(errno.ENOSPC, "no space")
        return real(fd, data[:n])  # the header: 3 bytes written, the rest lost

    real = os.write
    other = Journal(tmp_path / "k", ring)
    monkeypatch.setattr("msgate.storage.journal.os.write", short_write)
    with pytest.raises(OSError):
        other.append([b"never acknowledged"])
    monkeypatch.undo()
    assert list((tmp_path / "k").glob("*.jnl")) == []
