"""P-DATA-TF and DIMSE command-set codec for the C-STORE data phase (PS3.8 §9.3.5, PS3.7 §6.3, §9.3.1).

Pure functions over bytes, no sockets: split a P-DATA-TF PDU body into presentation data values,
decode a command set (always Implicit VR Little Endian, group 0000), encode the C-STORE response, and
build the Part-10 file meta header that pynetdicom's ``Event.encoded_dataset()`` puts in front of a
received dataset (so what msgate stores does not depend on which path received it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_CANCEL_RQ = 0x0030, 0x0FFF
SERVED = frozenset({C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ})  # the requests a store-only acceptor answers
NO_DATASET = 0x0101

_ITEM = struct.Struct(">IBB")  # PDV item length, presentation context ID, message control header
_ELEMENT = struct.Struct("<HHI")  # implicit VR LE: group, element, value length


class MalformedPdu(ValueError):
    """The PDU's items do not add up to its length, or a command set cannot be decoded."""


@dataclass(frozen=True)
class Pdv:
    context_id: int
    is_command: bool
    is_last: bool
    data: memoryview

    def pdu(self) -> bytes:
        """This PDV alone as a P-DATA-TF PDU (to hand a message that shared a PDU to pynetdicom)."""
        control = (0x01 if self.is_command else 0x00) | (0x02 if self.is_last else 0x00)
        item = _ITEM.pack(len(self.data) + 2, self.context_id, control) + bytes(self.data)
        return struct.pack(">BBI", 0x04, 0x00, len(item)) + item


def split_pdvs(body: memoryview) -> list[Pdv]:
    """The PDV items of a P-DATA-TF PDU body (the bytes after the 6-byte PDU header)."""
    out, offset, end = [], 0, len(body)
    while offset < end:
        if offset + 6 > end:
            raise MalformedPdu("PDV item header overruns the PDU")
        length, context_id, control = _ITEM.unpack_from(body, offset)
        if length < 2 or offset + 4 + length > end:
            raise MalformedPdu("PDV item length does not fit the PDU")
        out.append(Pdv(context_id, bool(control & 0x01), bool(control & 0x02), body[offset + 6:offset + 4 + length]))
        offset += 4 + length
    if not out:
        raise MalformedPdu("P-DATA-TF without a PDV item")
    return out


@dataclass(frozen=True)
class Command:
    """The fields of a DIMSE command set the data phase needs (values as decoded strings and ints)."""

    field: int
    message_id: int
    dataset_type: int
    sop_class_uid: str
    sop_instance_uid: str


def decode_command(data: bytes) -> Command:
    """Decode a command set (PS3.7 §6.3.1: Implicit VR Little Endian); MalformedPdu if it overruns."""
    values: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if offset + 8 > end:
            raise MalformedPdu("command element header overruns the command set")
        group, element, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            raise MalformedPdu("command set holds a non-command element or overruns")
        values[element] = data[offset:offset + length]
        offset += length
    try:
        return Command(field=_us(values[0x0100]), message_id=_us(values.get(0x0110, b"\0\0")),
                       dataset_type=_us(values.get(0x0800, struct.pack("<H", NO_DATASET))),
                       sop_class_uid=_ui(values.get(0x0002, b"")), sop_instance_uid=_ui(values.get(0x1000, b"")))
    except (KeyError, struct.error, UnicodeDecodeError):
        raise MalformedPdu("command set lacks a valid Command Field") from None


def _us(raw: bytes) -> int:
    return int(struct.unpack("<H", raw[:2])[0])


def _ui(raw: bytes) -> str:
    return raw.decode("ascii").rstrip("\0 ")


def _implicit(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def encode_store_rsp(command: Command, status: int) -> bytes:
    """The C-STORE-RSP command set (PS3.7 §9.3.1.2), elements in ascending tag order."""
    body = b"".join((
        _implicit(0x0002, _uid_value(command.sop_class_uid)),
        _implicit(0x0100, struct.pack("<H", C_STORE_RSP)),
        _implicit(0x0120, struct.pack("<H", command.message_id)),
        _implicit(0x0800, struct.pack("<H", NO_DATASET)),
        _implicit(0x0900, struct.pack("<H", status)),
        _implicit(0x1000, _uid_value(command.sop_instance_uid)),
    ))
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def command_pdus(context_id: int, command: bytes, max_pdu: int) -> list[bytes]:
    """P-DATA-TF PDUs carrying a command set, fragmented for the peer's maximum PDU length (0: none)."""
    room = len(command) if not max_pdu else max(1, max_pdu - 6)
    pieces = [command[i:i + room] for i in range(0, len(command), room)] or [b""]
    out = []
    for index, piece in enumerate(pieces):
        control = 0x03 if index == len(pieces) - 1 else 0x01
        item = _ITEM.pack(len(piece) + 2, context_id, control) + piece
        out.append(struct.pack(">BBI", 0x04, 0x00, len(item)) + item)
    return out


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_meta(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta group (PS3.10 §7.1), as pynetdicom's ``encoded_dataset()``."""
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    elements = b"".join((
        _explicit(0x0001, b"OB", b"\x00\x01"),
        _explicit(0x0002, b"UI", _uid_value(sop_class_uid)),
        _explicit(0x0003, b"UI", _uid_value(sop_instance_uid)),
        _explicit(0x0010, b"UI", _uid_value(transfer_syntax)),
        _explicit(0x0012, b"UI", _uid_value(str(PYNETDICOM_IMPLEMENTATION_UID))),
        _explicit(0x0013, b"SH", version + b" " if len(version) % 2 else version),
    ))
    return b"\0" * 128 + b"DICM" + _explicit(0x0000, b"UL", struct.pack("<I", len(elements))) + elements
