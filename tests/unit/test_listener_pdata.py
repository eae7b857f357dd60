"""The data-phase codec against pynetdicom's own encoders: same file meta, same command sets."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, MRImageStorage, generate_uid
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from msgate.listener import pdata


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless, "1.2.840.10008.1.2"])
def test_file_meta_is_byte_identical_to_pynetdicom(syntax: str) -> None:
    uid = generate_uid()
    ours = pdata.file_meta(sop_class_uid=MRImageStorage, sop_instance_uid=uid, transfer_syntax=syntax)
    theirs = b"\0" * 128 + b"DICM" + encode_file_meta(
        create_file_meta(sop_class_uid=MRImageStorage, sop_instance_uid=uid, transfer_syntax=syntax))
    assert ours == theirs


def _pynetdicom_command(primitive: C_STORE, message_cls: type) -> bytes:
    message = message_cls()
    message.primitive_to_message(primitive)
    return bytes(message.encode_msg(1, 16382).__next__().presentation_data_value_list[0][1][1:])


def test_store_request_decodes_and_response_matches_pynetdicom() -> None:
    uid = generate_uid()
    request = C_STORE()
    request.MessageID, request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = 7, MRImageStorage, uid
    request.Priority, request.DataSet = 2, BytesIO(b"\x08\x00\x18\x00")
    command = pdata.decode_command(_pynetdicom_command(request, C_STORE_RQ))
    assert (command.field, command.message_id, command.sop_class_uid, command.sop_instance_uid) == (
        pdata.C_STORE_RQ, 7, MRImageStorage, uid)
    assert command.dataset_type != pdata.NO_DATASET

    for status in (0x0000, 0xA700, 0xA900, 0xC210):
        response = C_STORE()
        response.MessageIDBeingRespondedTo, response.Status = 7, status
        response.AffectedSOPClassUID, response.AffectedSOPInstanceUID = MRImageStorage, uid
        assert pdata.encode_store_rsp(command, status) == _pynetdicom_command(response, C_STORE_RSP)


def test_pdvs_split_and_malformed_pdus_are_refused() -> None:
    pdus = pdata.command_pdus(3, b"x" * 25, max_pdu=16)
    assert len(pdus) == 3 and all(len(p) <= 16 + 6 for p in pdus)
    pdvs = [pv for p in pdus for pv in pdata.split_pdvs(memoryview(p)[6:])]
    assert b"".join(bytes(p.data) for p in pdvs) == b"x" * 25
    assert [p.is_last for p in pdvs] == [False, False, True] and all(p.is_command and p.context_id == 3 for p in pdvs)
    with pytest.raises(pdata.MalformedPdu):
        pdata.split_pdvs(memoryview(pdus[0])[6:-1])
    with pytest.raises(pdata.MalformedPdu):
        pdata.decode_command(b"\x00\x00\x00\x01\x04\x00\x00")
