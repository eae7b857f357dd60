"""Every public conformance message gets the right answer over real MLLP, and supported ones map."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from hl7_helpers import CONFORMANCE, RawClient, err, make_store, msa, running_server, wait_row
from sqlmodel import select

from msgate.hl7 import mllp
from msgate.hl7.msh import read_msh
from msgate.hl7.parse import is_batch, split_batch
from msgate.storage.models import Hl7Message, Observation, Order, Patient, PatientIdentifier

pytestmark = pytest.mark.integration
FILES = sorted(CONFORMANCE.glob("*.hl7"))
assert len(FILES) == 36, f"the public HL7 conformance set is missing from {CONFORMANCE}"  # never an empty, green run
UNSUPPORTED = {"bar_p01_v2.4_nondefault_subcomp_hapi.hl7": "200", "erp_z99_v2.3.1_olis_8859-1_zseg_hapi.hl7": "200",
               "mdm_t02_v2.3.1_escapes_nhapi.hl7": "200", "oml_o21_v2.5.1_5char_encoding_nist_mig.hl7": "200"}
# Mapping outcome other than "mapped", with the reason.
NOT_MAPPED = {
    "adt_a24_nondefault_separators_hapi.hl7": ("skipped", None),  # A24 (link) is stored, not mapped
    "oru_r01_v2.4_ft_highlight_hapi.hl7": ("error", "no_patient_segment"),  # published without PID
    "oru_r01_v2.5.1_newborn_screening_large_monai_mig.hl7": ("error", "no_patient_identifier"),  # PID-3 has no id
}

# The application ACK of a message that could not be mapped names what is missing (ERR-2 location, ERR-3).
APP_ERR = {"oru_r01_v2.4_ft_highlight_hapi.hl7": ("PID", "100"),
           "oru_r01_v2.5.1_newborn_screening_large_monai_mig.hl7": ("PID^1^3", "101")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    # 12 of the samples are training (T) or debugging (D) messages: a test feed accepts them (production
    # accepts P only: test_training_messages_are_refused_by_default)
    store = make_store(tmp_path_factory.mktemp("conf"), processing_ids=["P", "T", "D"])
    with running_server(store) as srv:
        yield srv, store
    store.close()


def _answers(client: RawClient, count: int, timeout: float) -> list[bytes]:
    client.sock.settimeout(timeout)
    out = []
    try:
        while len(out) < count:
            out.append(client.recv_frame())
    except (socket.timeout, TimeoutError):
        pass
    return out


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_conformance_message_answer_and_mapping(server, path: Path) -> None:  # type: ignore[no-untyped-def]
    srv, store = server
    raw = path.read_bytes()
    messages = split_batch(raw)[0] if is_batch(raw) else [raw]
    msh = read_msh(messages[0])
    key = store.ingest.dedup_key(msh.header(), messages[0])
    client = RawClient(srv.port)
    try:
        client.send(mllp.frame(raw))
        if path.name in UNSUPPORTED:
            answer = _answers(client, 1, 10)[0]
            reject = "CR" if msh.enhanced else "AR"  # a commit reject in enhanced mode (v2.5.1 table 0008)
            assert msa(answer)[1] == reject and msa(answer)[2] == msh.control_id
            fields = err(answer)
            assert UNSUPPORTED[path.name] in "^".join(fields)
            return
        enhanced = msh.enhanced
        expect_accept = not (enhanced and msh.accept_ack in ("NE", "ER"))
        expect_app = enhanced and msh.app_ack in ("AL", "SU")
        answers = _answers(client, int(expect_accept) + int(expect_app), 10 if expect_accept else 1.5)
    finally:
        client.close()
    codes = [msa(a)[1] for a in answers]
    if expect_accept and is_batch(raw):
        assert answers[0].startswith(b"FHS") and codes == ["AA"]
    elif expect_accept:
        assert codes[0] == ("CA" if enhanced else "AA")
        assert all(msa(a)[2] == msh.control_id for a in answers)
    else:
        assert answers == []
    if expect_app and path.name in NOT_MAPPED and NOT_MAPPED[path.name][0] == "error":
        fields = err(answers[-1])
        if len(fields) > 3:  # v2.5+: ERR-2 location, ERR-3 code
            where, code = fields[2], fields[3].split("^")[0]
        else:  # before v2.5: ERR-1 segment^sequence^field^code&text&table
            parts = fields[1].split("^")
            where, code = "^".join(parts[:3]).rstrip("^"), parts[3].split("&")[0]
        assert codes[-1] == "AE" and (where, code) == APP_ERR[path.name], fields
    elif expect_app:
        assert codes[-1] == "AA"
    header = msh.header()
    # some published samples reuse another's sender and MSH-10 (template copies): each is still its own
    # message, stored and mapped (they used to be taken for resends and dropped)
    wait_row(store, header, messages[0])
    with store.db.session() as session:
        row = session.exec(select(Hl7Message).where(Hl7Message.dedup_index == key)).one()
        state, error = NOT_MAPPED.get(path.name, ("mapped", None))
        assert (row.mapping_state, row.mapping_error) == (state, error)
        assert row.message_type == header.message_type and row.trigger == header.trigger
        if path.name.startswith("omi_o23"):  # declared 8859/1, carries UTF-8: read as UTF-8, and said so
            assert "charset_mismatch_utf8" in str(row.validation)
        if state != "mapped":
            return
        mtype = header.message_type
        if mtype in ("ADT", "ORM", "OMI", "ORU"):
            assert row.patient_id is not None
            patient = session.get(Patient, row.patient_id)
            assert patient is not None and patient.merged_into_id is None
            ids = session.exec(select(PatientIdentifier).where(PatientIdentifier.patient_id == patient.id)).all()
            assert ids
        if mtype in ("ORM", "OMI"):
            assert session.exec(select(Order).where(Order.message_id == row.id)).first() is not None
        if mtype == "ORU":
            obs = session.exec(select(Observation).where(Observation.message_id == row.id)).all()
            expected = _obx_with_code(messages[0])  # 0 for the samples whose OBX-3 carries no code
            assert len(obs) == expected and (expected or "no_observations" in str(row.validation)), path.name


def _obx_with_code(raw: bytes) -> int:
    """OBX segments whose OBX-3 has a code (each one is an observation row, a pending one without a value
    included; an OBX without a code is a finding, not a row)."""
    text = raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").decode("latin-1")
    sep, component = text[3], text[4]
    return sum(1 for line in text.split("\r")
               if line.startswith("OBX" + sep) and len(fields := line.split(sep)) > 3
               and fields[3].split(component)[0].strip())


def _duplicates(store, key: str) -> int:  # type: ignore[no-untyped-def]
    for _ in range(100):
        with store.db.session() as session:
            count = session.exec(select(Hl7Message.duplicates).where(Hl7Message.dedup_index == key)).one()
        if count:
            return int(count)
        time.sleep(0.05)
    return 0


def test_a_resend_is_a_duplicate_and_a_reused_control_id_is_a_new_message(tmp_path: Path) -> None:
    """adt_a08/a28/a31_v2.8 reuse adt_a01_v2.8's sender and MSH-10 (MSG00001); the HCV ELR reuses the
    campylobacter one's. They were acknowledged AA and dropped as resends: each is its own message. A
    true resend (the same content, MSH-7 restamped) is still a duplicate, acknowledged and not stored twice."""
    store = make_store(tmp_path)
    first = (CONFORMANCE / "adt_a01_v2.8_fhirconverter.hl7").read_bytes()
    others = [(CONFORMANCE / name).read_bytes() for name in (
        "adt_a08_v2.8_fhirconverter.hl7", "adt_a28_v2.8_fhirconverter.hl7", "adt_a31_v2.8_fhirconverter.hl7")]
    msh7 = read_msh(first).get(7)
    resend = first.replace(msh7.encode(), b"20991231235959", 1) if msh7 else first
    assert len({read_msh(m).control_id for m in [first, *others]}) == 1
    try:
        with running_server(store) as srv:
            client = RawClient(srv.port)
            try:
                for raw in [first, *others, resend]:
                    client.send(mllp.frame(raw))
                    assert msa(_answers(client, 1, 10)[0])[1] == "AA"
            finally:
                client.close()
            for raw in [first, *others]:
                wait_row(store, read_msh(raw).header(), raw)
        with store.db.session() as session:
            rows = session.exec(select(Hl7Message).order_by(Hl7Message.id)).all()
            assert [r.trigger for r in rows] == ["A01", "A08", "A28", "A31"]
            assert [r.duplicates or 0 for r in rows] == [1, 0, 0, 0]
    finally:
        store.close()


def test_training_messages_are_refused_by_default(tmp_path: Path) -> None:
    """MSH-11 T (training) or D (debugging) sent to a production feed (the default accepts P only) must
    not become a live patient's EHR: refused before storing, error 202 at MSH-11, CR in enhanced mode."""
    store = make_store(tmp_path)
    try:
        with running_server(store) as srv:
            client = RawClient(srv.port)
            try:
                for name, code in (("adt_a01_v2.7_linuxforhealth.hl7", "CR"),  # MSH-15 AL: enhanced
                                   ("oru_r01_v2.5_cbc_fhirconverter.hl7", "AR")):
                    raw = (CONFORMANCE / name).read_bytes()
                    client.send(mllp.frame(raw))
                    answer = _answers(client, 1, 10)[0]
                    assert msa(answer)[1:3] == [code, read_msh(raw).control_id]
                    assert "202" in "|".join(err(answer)) and "MSH^1^11" in "|".join(err(answer))
            finally:
                client.close()
        with store.db.session() as session:
            assert session.exec(select(Hl7Message)).first() is None and session.exec(select(Patient)).first() is None
    finally:
        store.close()



def test_conformance_values_land_in_the_right_columns(tmp_path: Path) -> None:
    """What three public samples say, checked field by field against their text (the main test only
    checks that something was mapped): escapes decoded (10\\S\\9/L), SN ^182 as a number, OBX-14 with
    an offset stored in UTC, OBR-7 as the time when OBX-14 is empty, PID-3 with its authority and type."""
    from datetime import UTC, datetime

    from msgate.hl7.mapping import map_messages

    store = make_store(tmp_path, processing_ids=["P", "T", "D"])
    dec = store.cipher.decrypt
    try:
        for name in ("oru_r01_v2.3_cbc_zsegments_monai_mig.hl7", "oru_r01_v2.5.1_cbc_nist_lri_fhirconverter.hl7",
                     "oru_r01_v2.4_glucose_pythonhl7.hl7"):
            raw = (CONFORMANCE / name).read_bytes()
            mid = store.ingest.store_hl7(raw=raw, header=read_msh(raw).header()).message_id
            assert map_messages(store, [mid])[mid].state == "mapped", name
        with store.db.session() as session:
            def obs(code: str) -> tuple[str | None, str, str, datetime]:
                row = session.exec(select(Observation).where(Observation.code == code)).one()
                at = row.observed_at if row.observed_at.tzinfo else row.observed_at.replace(tzinfo=UTC)
                return dec(row.value_enc, column="observation.value"), row.unit, row.value_type, at

            ids = {(dec(i.value_enc, column="patient_identifier.value"), i.authority, i.id_type)
                   for i in session.exec(select(PatientIdentifier)).all()}
            assert {("AND234DA_PID3", "", "MR"), ("PATID1234", "NIST MPI", "MR"), ("555-44-4444", "", "MR")} <= ids
            assert obs("301.0500") == ("10.1", "10^9/L", "NM", datetime(2014, 11, 13, 9, 16, tzinfo=UTC))
            assert obs("26453-1") == ("4.41", "10*6/uL", "NM", datetime(2011, 1, 3, 22, 34, 28, tzinfo=UTC))  # -0800
            assert obs("1554-5") == ("182", "mg/dl", "SN", datetime(2002, 2, 15, 7, 30, tzinfo=UTC))  # OBR-7
    finally:
        store.close()
