"""A DICOM journal record: the instance as received, with the calling AE title and association id."""

from __future__ import annotations

import struct

from msgate.storage.ingest import Received

MAGIC = b"MGD1"


def encode_record(item: Received) -> bytes:
    aet, assoc = item.calling_aet.encode(), (item.assoc_id or "").encode()
    return b"".join((MAGIC, struct.pack(">H", len(aet)), aet, struct.pack(">H", len(assoc)), assoc, item.data))


def decode_record(raw: bytes) -> tuple[str, str | None, bytes]:
    """(calling AE title, association id, the instance as received); ValueError if not a record."""
    if raw[:4] != MAGIC:
        raise ValueError("not a DICOM journal record")
    (n,) = struct.unpack_from(">H", raw, 4)
    aet = raw[6:6 + n].decode()
    (m,) = struct.unpack_from(">H", raw, 6 + n)
    assoc = raw[8 + n:8 + n + m].decode()
    return aet, assoc or None, raw[8 + n + m:]
