"""Cheap checks on a received dataset before it is stored: the header, and that nothing is truncated.

The header (everything before Pixel Data) is parsed with pydicom; the whole dataset, pixel data included,
is only *walked* as well: element lengths (and encapsulated fragments) must add up exactly to the
bytes received (PS3.5 §7.1, §A.4). A dataset cut short in its pixel data is thus refused with a
failure status instead of being stored as if it were complete. Nothing is decoded or transcoded.
"""

from __future__ import annotations

import io
import struct
import zlib

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from msgate.errors import Rejected

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"}


def parse(data: bytes) -> Dataset:
    """Header of an encoded dataset (file meta + dataset); Rejected if undecodable, incomplete or truncated."""
    handle = io.BytesIO(data)
    try:
        ds = dcmread(handle, stop_before_pixels=True, force=True)
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError, AttributeError, struct.error,
            zlib.error):
        raise Rejected("undecodable dataset", code="undecodable") from None
    check_uids(ds)
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    offset = _dataset_start(data)
    if ts not in _DEFLATED and offset < len(data):
        little = ts != "1.2.840.10008.1.2.2"
        implicit = ts == "1.2.840.10008.1.2" or not ts
        walk_tail(data, offset, little=little, implicit=implicit)
    return ds


def _dataset_start(data: bytes) -> int:
    """Offset of the dataset after the Part-10 preamble and file meta group (PS3.10 §7.1)."""
    if data[128:132] != b"DICM":
        return 0
    offset = 132
    while offset + 8 <= len(data) and data[offset:offset + 2] == b"\x02\x00":
        vr = data[offset + 4:offset + 6]
        if vr in _LONG_VRS:
            offset += 12 + struct.unpack_from("<I", data, offset + 8)[0]
        else:
            offset += 8 + struct.unpack_from("<H", data, offset + 6)[0]
    return offset


def check_uids(ds: Dataset) -> None:
    """The identifying UIDs ingest needs (same Rejected codes as ``storage.ingest.read_header``)."""
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        try:
            value = ds.get(keyword)
        except Exception:  # pydicom decodes lazily; a corrupt element surfaces here
            raise Rejected("undecodable dataset (corrupt element)", code="undecodable") from None
        if value is None or str(value).strip() == "":
            raise Rejected(f"dataset has no {keyword}", code=f"missing_{keyword}")


def walk_tail(data: bytes, offset: int, *, little: bool, implicit: bool) -> None:
    """Walk the elements from ``offset`` to the end; Rejected(code="truncated") if they overrun."""
    end = _walk(data, offset, "<" if little else ">", implicit, nested=False)
    if end != len(data):
        raise Rejected("dataset truncated (element longer than the data received)", code="truncated")


def _walk(data: bytes, offset: int, e: str, implicit: bool, *, nested: bool) -> int:
    """Walk elements; with ``nested`` stop after an item delimiter. Returns the offset reached."""
    end = len(data)
    while offset < end:
        if offset + 8 > end:
            raise Rejected("dataset truncated inside an element header", code="truncated")
        group, elem = struct.unpack_from(f"{e}HH", data, offset)
        vr = data[offset + 4:offset + 6]
        if group == 0xFFFE:
            length, offset = struct.unpack_from(f"{e}I", data, offset + 4)[0], offset + 8
            if elem == 0xE00D and nested:
                return offset
            raise Rejected("malformed dataset (unexpected delimiter)", code="undecodable")
        if implicit:
            length, offset = struct.unpack_from(f"{e}I", data, offset + 4)[0], offset + 8
        elif vr in _LONG_VRS:
            if offset + 12 > end:
                raise Rejected("dataset truncated inside an element header", code="truncated")
            length, offset = struct.unpack_from(f"{e}I", data, offset + 8)[0], offset + 12
        else:
            length, offset = struct.unpack_from(f"{e}H", data, offset + 6)[0], offset + 8
        if length == _UNDEFINED:
            offset = _items(data, offset, e, implicit)
            continue
        offset += length
        if offset > end:
            raise Rejected("dataset truncated (element longer than the data received)", code="truncated")
    if nested:
        raise Rejected("dataset truncated (no item delimiter)", code="truncated")
    return offset


def _items(data: bytes, offset: int, e: str, implicit: bool) -> int:
    """Items of an undefined-length sequence or encapsulated pixel data, through the sequence delimiter."""
    end = len(data)
    while True:
        if offset + 8 > end:
            raise Rejected("dataset truncated (no sequence delimiter)", code="truncated")
        group, elem, length = struct.unpack_from(f"{e}HHI", data, offset)
        offset += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return offset
        if (group, elem) != (0xFFFE, 0xE000):
            raise Rejected("malformed sequence", code="undecodable")
        if length == _UNDEFINED:
            offset = _walk(data, offset, e, implicit, nested=True)
            continue
        offset += length
        if offset > end:
            raise Rejected("dataset truncated inside an item", code="truncated")


__all__ = ["check_uids", "parse", "walk_tail"]
