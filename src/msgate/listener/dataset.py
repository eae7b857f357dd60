"""Cheap checks on a received dataset before it is stored: the identifying header, and that nothing is
truncated.

The whole dataset, pixel data included, is *walked* once: element lengths (and encapsulated fragments)
must add up exactly to the bytes received (PS3.5 §7.1, §A.4), so a dataset cut short is refused with a
failure status instead of being stored as if it were complete. The same walk picks up the few
top-level values every instance needs (SOP Class/Instance, Study and Series UIDs, Modality, Instance
Number). The full header is only parsed with pydicom when it is needed (the first instance of a new
series or study: :meth:`Header.dataset`), and for the cases the walk does not cover (a deflated
transfer syntax, a dataset without file meta). Nothing is decoded or transcoded.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from msgate.errors import Rejected

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"}


_WANTED = {0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x0020000D: "StudyInstanceUID",
           0x0020000E: "SeriesInstanceUID", 0x00080060: "Modality", 0x00200013: "InstanceNumber",
           0x00280008: "NumberOfFrames"}
_UIDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass
class Header:
    """The identifying values of one received dataset; the full pydicom header on demand."""

    values: dict[str, str]
    transfer_syntax: str
    data: bytes | None = field(default=None, repr=False)
    _ds: Dataset | None = field(default=None, repr=False)

    def get(self, keyword: str) -> str:
        return self.values.get(keyword, "")

    def dataset(self) -> Dataset:
        """Everything before Pixel Data, parsed with pydicom once (needs :attr:`data`, or a parsed dataset)."""
        if self._ds is None:
            if self.data is None:
                raise RuntimeError("the header's bytes were released before the dataset was parsed")
            self._ds = dcmread(io.BytesIO(self.data), stop_before_pixels=True, force=True)
        return self._ds

    def release(self) -> None:
        """Drop the reference to the received bytes (the body is stored; only the header stays)."""
        self.data = None


def header_of(ds: Dataset) -> Header:
    """A Header from a dataset pydicom already parsed (files read from disk, the fallback below)."""
    values = {}
    for keyword in _WANTED.values():
        try:
            value = ds.get(keyword)
        except Exception:  # pydicom decodes lazily; a corrupt element surfaces here
            raise Rejected("undecodable dataset (corrupt element)", code="undecodable") from None
        values[keyword] = "" if value is None else str(value).strip()
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    return Header(values, ts, _ds=ds)


def parse(data: bytes) -> Header:
    """Header of an encoded dataset (file meta + dataset); Rejected if undecodable, incomplete or truncated."""
    offset, ts = _dataset_start(data), _meta_transfer_syntax(data)
    if offset and ts and ts not in _DEFLATED:
        little = ts != "1.2.840.10008.1.2.2"
        found: dict[int, bytes] = {}
        end = _walk(data, offset, "<" if little else ">", ts == "1.2.840.10008.1.2", nested=False, found=found)
        if end != len(data):
            raise Rejected("dataset truncated (element longer than the data received)", code="truncated")
        values = {_WANTED[tag]: _text_value(raw) for tag, raw in found.items()}
        for keyword in _UIDS:
            if not values.get(keyword):
                raise Rejected(f"dataset has no {keyword}", code=f"missing_{keyword}")
        return Header(values, ts, data=data)
    return _parse_with_pydicom(data)


def _text_value(raw: bytes) -> str:
    try:
        return raw.decode("ascii").strip("\0 ")
    except UnicodeDecodeError:
        raise Rejected("undecodable dataset (identifying value is not ASCII)", code="undecodable") from None


def _meta_transfer_syntax(data: bytes) -> str:
    """(0002,0010) from the file meta group, or "" (PS3.10 §7.1)."""
    if data[128:132] != b"DICM":
        return ""
    offset = 132
    while offset + 8 <= len(data) and data[offset:offset + 2] == b"\x02\x00":
        element = struct.unpack_from("<H", data, offset + 2)[0]
        vr = data[offset + 4:offset + 6]
        if vr in _LONG_VRS:
            length, start = struct.unpack_from("<I", data, offset + 8)[0], offset + 12
        else:
            length, start = struct.unpack_from("<H", data, offset + 6)[0], offset + 8
        if element == 0x0010:
            return _text_value(data[start:start + length])
        offset = start + length
    return ""


def _parse_with_pydicom(data: bytes) -> Header:
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
    header = header_of(ds)
    header.data = data
    return header


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


def _walk(data: bytes, offset: int, e: str, implicit: bool, *, nested: bool,
          found: dict[int, bytes] | None = None) -> int:
    """Walk elements; with ``nested`` stop after an item delimiter. Returns the offset reached.
    With ``found``, the values of the :data:`_WANTED` elements at this level are put there."""
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
            if not implicit and vr == b"UN":  # PS3.5 §6.2.2: a sequence of unknown VR, its items in
                offset = _items(data, offset, "<", True)  # Implicit VR Little Endian (a forwarded private SQ)
            else:
                offset = _items(data, offset, e, implicit)
            continue
        if found is not None and (group << 16 | elem) in _WANTED:
            found[group << 16 | elem] = data[offset:offset + length]
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


__all__ = ["Header", "check_uids", "header_of", "parse", "walk_tail"]
