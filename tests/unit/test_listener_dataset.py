"""The pre-store checks: header, required UIDs, truncation; and their DIMSE status codes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from msgate.errors import Rejected
from msgate.listener.dataset import parse
from msgate.listener.handlers import status_for

FILES = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
         "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_dcmtk.dcm"]
CONFORMANCE = Path(__file__).resolve().parents[2].parent / "shared" / "conformance" / "dicom"


def _all() -> list[bytes]:
    paths = [Path(get_testdata_file(n)) for n in FILES] + sorted(CONFORMANCE.glob("*.dcm"))
    return [p.read_bytes() for p in paths]


@pytest.mark.parametrize("data", _all())
def test_complete_files_pass_and_truncated_ones_are_refused(data: bytes) -> None:
    header = parse(data)
    ds = dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"):
        assert header.get(keyword) == str(ds.get(keyword, "")), keyword
    assert header.get("InstanceNumber") == ("" if ds.get("InstanceNumber") is None else str(ds.InstanceNumber))
    assert header.transfer_syntax == str(ds.file_meta.TransferSyntaxUID)
    assert header.dataset().SOPInstanceUID == ds.SOPInstanceUID
    for cut in (1, 10, 100, len(data) // 2):
        with pytest.raises(Rejected) as info:
            parse(data[:-cut])
        assert status_for(info.value) in (0xC210, 0xA900)


def test_missing_uid_is_a900_and_garbage_is_c210() -> None:
    ds = dcmread(get_testdata_file("MR_small.dcm"))
    del ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    with pytest.raises(Rejected) as info:
        parse(buf.getvalue())
    assert status_for(info.value) == 0xA900
    with pytest.raises(Rejected) as info:
        parse(bytes(range(256)) * 10)
    assert status_for(info.value) in (0xC210, 0xA900)


def test_a_private_sequence_forwarded_as_un_of_undefined_length_is_accepted() -> None:
    """A PACS that forwards a private sequence it does not know sends it as UN of undefined length; its
    items are then Implicit VR Little Endian (PS3.5 §6.2.2). The walker read them as explicit VR and
    refused a valid dataset with 0xC210."""
    import struct

    ds = dcmread(get_testdata_file("MR_small.dcm"))
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091001, "OB", b"MARKMARK")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    marker = b"\x09\x00\x01\x10OB\x00\x00\x08\x00\x00\x00MARKMARK"
    item = b"\x09\x00\x02\x10" + struct.pack("<I", 4) + b"ABCD"  # implicit VR inside
    sequence = (b"\x09\x00\x01\x10UN\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + item
                + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    data = buf.getvalue().replace(marker, sequence)
    assert data != buf.getvalue()
    assert parse(data).get("SOPInstanceUID") == str(ds.SOPInstanceUID)
    with pytest.raises(Rejected):
        parse(data[:-1])
