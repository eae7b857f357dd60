"""Mapping edge cases on messages built with hl7apy: v2.3/v2.7, custom delimiters, escapes, repeated OBX,
Z-segments, unit conversion, corrections and withdrawals, merges, orders linked by accession; snapshot."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from hl7apy.core import Message
from sqlmodel import select

from msgate.config import load_settings
from msgate.hl7.mapping import map_messages
from msgate.hl7.msh import read_msh
from msgate.storage import repo_ehr
from msgate.storage.models import Hl7Message, Observation, Order, Patient
from msgate.storage.store import Store, open_store


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    s = open_store(load_settings(home=tmp_path, storage={"min_free_bytes": 0}))
    yield s  # type: ignore[misc]
    s.close()


def _oru(version: str, cid: str, obx: list[tuple[str, str, str, str, str]], mrn: str = "M1",
         enc: dict[str, str] | None = None) -> bytes:
    msg = Message("ORU_R01", version=version, **({"encoding_chars": enc} if enc else {}))
    c = (enc or {}).get("COMPONENT", "^")
    msg.msh.msh_3, msg.msh.msh_4, msg.msh.msh_7 = "LAB", "HOSP", "20250101120000"
    msg.msh.msh_9 = (f"ORU{c}R01{c}ORU_R01" if version != "2.3" else f"ORU{c}R01")
    msg.msh.msh_10, msg.msh.msh_11 = cid, "P"
    pid = msg.add_segment("PID")
    pid.pid_3 = f"{mrn}{c}{c}{c}HOSP{c}MR"
    pid.pid_5 = f"DOE{c}JANE"
    pid.pid_7 = "19800101"
    pid.pid_8 = "F"
    obr = msg.add_segment("OBR")
    obr.obr_1, obr.obr_7 = "1", "20250101100000"
    for n, (vt, code, value, unit, status) in enumerate(obx, 1):
        seg = msg.add_segment("OBX")
        seg.obx_1, seg.obx_2, seg.obx_3 = str(n), vt, code.replace("^", c)
        seg.obx_5, seg.obx_11 = value, status
        if unit:
            seg.obx_6 = unit
    er7 = msg.to_er7().replace("\n", "\r")
    return (er7 + "\rZPR|1|custom\r").encode()


def _store_and_map(store: Store, raw: bytes) -> int:
    stored = store.ingest.store_hl7(raw=raw, header=read_msh(raw).header())
    outcome = map_messages(store, [stored.message_id])[stored.message_id]
    assert outcome.state == "mapped", outcome
    return stored.message_id


def _obs(store: Store, code: str) -> list[tuple[str | None, bool, str, str | None]]:
    with store.db.session() as s:
        rows = s.exec(select(Observation).where(Observation.code == code).order_by(Observation.id)).all()
        return [(store.cipher.decrypt(r.value_enc, column="observation.value"), r.withdrawn, r.unit, r.feature)
                for r in rows]


@pytest.mark.parametrize("version", ["2.3", "2.5.1", "2.7"])
def test_oru_versions_units_repeated_obx(store: Store, version: str) -> None:
    raw = _oru(version, "V" + version, [("NM", "101281-4^NfL^LN", "0.012", "ng/mL", "F"),
                                        ("NM", "MS-T25FW^T25FW^L", "0.1", "min", "F"),
                                        ("ST", "X1^Note^L", "a\\T\\b", "", "F")])
    _store_and_map(store, raw)
    assert _obs(store, "101281-4") == [("12.0", False, "pg/mL", "nfl")]
    assert _obs(store, "MS-T25FW") == [("6.0", False, "s", "t25fw")]
    assert _obs(store, "X1")[0][0] == "a&b"


def test_non_finite_numbers_never_feed_the_model(store: Store) -> None:
    """Python's float() takes "NaN" and "inf": stored as present they failed the HE batch (TenSEAL
    refuses non-finite values) and gave NaN logits in plaintext."""
    from msgate.workers import ehr

    _store_and_map(store, _oru("2.5.1", "N1", [("NM", "101281-4^NfL^LN", "NaN", "pg/mL", "F"),
                                               ("NM", "14117-6^IgG index^LN", "inf", "", "F")]))
    assert [o[3] for o in _obs(store, "101281-4") + _obs(store, "14117-6")] == [None, None]
    vec = ehr.vector({"nfl": {"value": "nan"}, "igg_index": {"value": "0.7"}})
    assert not vec.present[vec.names.index("nfl")] and np.isfinite(vec.values).all()


def test_repeated_obx_lines_are_corrected_one_by_one(store: Store) -> None:
    """A report's text and its code share OBX-3 (18783-1) with no sub-ID: a corrected report replaced
    both stored lines' counterpart with the last corrected line, and the old text stayed current."""
    lines = [("TX", "18783-1^Recommendation^LN", "CT in 6 months", "", "F"),
             ("CE", "18783-1^Recommendation^LN", "CT10", "", "F")]
    _store_and_map(store, _oru("2.5.1", "R1", lines))
    _store_and_map(store, _oru("2.5.1", "R2", [("TX", "18783-1^Recommendation^LN", "MRI in 3 months", "", "C"),
                                               ("CE", "18783-1^Recommendation^LN", "MR20", "", "C")]))
    assert [o[0] for o in _obs(store, "18783-1")] == ["MRI in 3 months", "MR20"]


def test_custom_encoding_characters(store: Store) -> None:
    enc = {"FIELD": "|", "COMPONENT": "$", "REPETITION": "*", "ESCAPE": "!", "SUBCOMPONENT": "@"}
    _store_and_map(store, _oru("2.5", "E1", [("NM", "14117-6$IgG index$LN", "0.9", "", "F")], enc=enc))
    assert _obs(store, "14117-6") == [("0.9", False, "{ratio}", "igg_index")]


def test_correction_replaces_and_withdrawal_withdraws(store: Store) -> None:
    _store_and_map(store, _oru("2.5.1", "K1", [("NM", "101281-4^NfL^LN", "10", "pg/mL", "F")]))
    _store_and_map(store, _oru("2.5.1", "K2", [("NM", "101281-4^NfL^LN", "11", "pg/mL", "C")]))
    assert _obs(store, "101281-4") == [("11.0", False, "pg/mL", "nfl")]
    _store_and_map(store, _oru("2.5.1", "K3", [("NM", "101281-4^NfL^LN", "", "pg/mL", "W")]))
    assert _obs(store, "101281-4")[0][1] is True
    with store.db.session() as s:
        patient = s.exec(select(Patient)).one()
        snap = repo_ehr.snapshot(s, store.cipher, patient, datetime(2025, 2, 1, tzinfo=UTC))
    assert snap["nfl"] is None and snap["sex"]["value"] == "F" and 44 < snap["age"]["value"] < 46


def test_merge_moves_observations_to_survivor(store: Store) -> None:
    _store_and_map(store, _oru("2.5.1", "G1", [("NM", "101281-4^NfL^LN", "9", "pg/mL", "F")], mrn="OLD"))
    a40 = (b"MSH|^~\\&|ADT|HOSP|||20250102||ADT^A40^ADT_A39|G2|P|2.5.1\rEVN|A40|20250102\r"
           b"PID|1||NEW^^^HOSP^MR||DOE^JANE\rMRG|OLD^^^HOSP^MR\r")
    _store_and_map(store, a40)
    with store.db.session() as s:
        old = repo_ehr.find_patient(s, store.cipher, [repo_ehr.Identifier("OLD", "HOSP")])
        new = repo_ehr.find_patient(s, store.cipher, [repo_ehr.Identifier("NEW", "HOSP")])
        assert old is not None and new is not None and old.id == new.id
        assert {o.patient_id for o in s.exec(select(Observation)).all()} == {new.id}


def test_order_links_accession(store: Store) -> None:
    omi = (b"MSH|^~\\&|RIS|HOSP|||20250102||OMI^O23^OMI_O23|O1|P|2.5.1\rPID|1||M9^^^HOSP^MR\r"
           b"ORC|NW|PL1|FL1\rOBR|1|PL1|FL1|MR^MRI brain\rIPC|ACC123|RP1|1.2.3|SPS1|MR\r")
    mid = _store_and_map(store, omi)
    with store.db.session() as s:
        order = s.exec(select(Order)).one()
        assert order.accession_index == store.cipher.blind_index("ACC123", scope="accession")
        assert order.message_id == mid and order.patient_id is not None
        assert s.get(Hl7Message, mid).patient_id == order.patient_id  # type: ignore[union-attr]


def test_one_bad_message_does_not_take_its_batch_with_it(store: Store) -> None:
    good = [_oru("2.5.1", f"B{i}", [("NM", "101281-4^NfL^LN", "9", "pg/mL", "F")], mrn=f"B{i}") for i in (1, 2)]
    bad = b"MSH|^~\\&|LAB|HOSP|||20250101||ORU^R01|B3|P|2.5.1\rOBR|1\rOBX|1|NM|101281-4^NfL^LN||9\r"
    ids = [store.ingest.store_hl7(raw=r, header=read_msh(r).header()).message_id for r in (good[0], bad, good[1])]
    outcomes = map_messages(store, ids)
    assert [outcomes[i].state for i in ids] == ["mapped", "error", "mapped"]
    assert outcomes[ids[1]].error == "no_patient_segment"
    with store.db.session() as s:
        assert len(s.exec(select(Observation)).all()) == 2
        assert s.get(Hl7Message, ids[1]).mapping_state == "error"  # type: ignore[union-attr]


def _ehr_state(store: Store) -> dict[str, object]:
    """Everything mapping writes, by identifier instead of row id, values decrypted."""
    from msgate.storage.models import PatientIdentifier, Study

    dec = store.cipher.decrypt
    with store.db.session() as s:
        names = {i.patient_id: dec(i.value_enc, column="patient_identifier.value")
                 for i in s.exec(select(PatientIdentifier).order_by(PatientIdentifier.id)).all()}

        def who(pid: int | None) -> str | None:
            return None if pid is None else names.get(pid, f"no-identifier:{pid}")

        patients = {p.id: p for p in s.exec(select(Patient)).all()}
        return {
            "identifiers": sorted((dec(i.value_enc, column="patient_identifier.value"), i.authority,
                                   sorted(n for q, n in names.items() if q == repo_ehr.survivor(s, patients[i.patient_id]).id))
                                  for i in s.exec(select(PatientIdentifier)).all()),
            "merged": sorted((who(p.id), who(p.merged_into_id)) for p in patients.values() if p.merged_into_id),
            "observations": sorted((who(o.patient_id), o.code, o.code_system, str(o.observed_at),
                                    dec(o.value_enc, column="observation.value"), o.status, o.withdrawn, o.unit,
                                    o.feature) for o in s.exec(select(Observation)).all()),
            "studies": sorted((st.study_uid_index, who(st.patient_id)) for st in s.exec(select(Study)).all()),
            "orders": sorted((dec(o.placer_enc, column="order.placer") or "", who(o.patient_id))
                             for o in s.exec(select(Order)).all()),
            "messages": sorted((m.mapping_state, m.mapping_error or "", who(m.patient_id))
                               for m in s.exec(select(Hl7Message)).all()),
        }


def _feed() -> list[bytes]:
    """New patients, repeats, a correction and a withdrawal of values stored in the same batch, a merge of
    a patient whose results came earlier in the batch, results for the retired identifier after the merge,
    and an order. (No bad message: one would send the batch down the one-at-a-time path.)"""
    nfl, t25 = "101281-4^NfL^LN", "MS-T25FW^T25FW^L"
    a40 = (b"MSH|^~\\&|ADT|HOSP|||20250102||ADT^A40^ADT_A39|Q5|P|2.5.1\rEVN|A40|20250102\r"
           b"PID|1||SURV^^^HOSP^MR||DOE^JANE\rMRG|RET^^^HOSP^MR\r")
    omi = (b"MSH|^~\\&|RIS|HOSP|||20250102||OMI^O23^OMI_O23|Q9|P|2.5.1\rPID|1||NEWP^^^HOSP^MR\r"
           b"ORC|NW|PL1|FL1\rOBR|1|PL1|FL1|MR^MRI brain\rIPC|ACC1|RP1|1.2.3|SPS1|MR\r")
    return [
        _oru("2.5.1", "Q1", [("NM", nfl, "10", "pg/mL", "F"), ("NM", t25, "6", "s", "F")], mrn="RET"),
        _oru("2.5.1", "Q2", [("NM", nfl, "12", "pg/mL", "C")], mrn="RET"),
        _oru("2.5.1", "Q3", [("NM", t25, "", "s", "X"), ("NM", nfl, "7", "pg/mL", "F")], mrn="A"),
        _oru("2.5.1", "Q4", [("NM", nfl, "8", "pg/mL", "F"), ("NM", nfl, "8.5", "pg/mL", "F")], mrn="SURV"),
        a40,
        _oru("2.5.1", "Q6", [("NM", nfl, "13", "pg/mL", "C")], mrn="RET"),
        _oru("2.5.1", "Q7", [("NM", t25, "7", "s", "F")], mrn="SURV"),
        _oru("2.5.1", "Q8", [("NM", t25, "", "s", "W")], mrn="A"),
        omi,
        _oru("2.5.1", "Q11", [("NM", nfl, "14", "pg/mL", "C")], mrn="NEWP"),
    ]


def _with_studies(store: Store) -> None:
    """DICOM studies filed under identifiers before HL7 named their patients (linked by mapping)."""
    from msgate.storage.models import Study

    with store.db.session() as s:
        for n, mrn in enumerate(("RET", "SURV", "NEWP")):
            s.add(Study(study_uid_index=f"uid{n}", dicom_patient_index=repo_ehr.id_index(
                store.cipher, repo_ehr.Identifier(mrn, "HOSP")),
                accession_index=store.cipher.blind_index("ACC1", scope="accession") if mrn == "NEWP" else None))


def test_a_batch_maps_exactly_as_one_message_at_a_time(tmp_path: Path, settings: object) -> None:
    """The reference maps one message per transaction on SQLite; the batch runs on each backend."""
    from msgate.config import Settings

    assert isinstance(settings, Settings)
    states = []
    for mode, config in (("one at a time", load_settings(home=tmp_path / "reference", storage={"min_free_bytes": 0})),
                         ("one batch", settings)):
        store = open_store(config)
        _with_studies(store)
        ids = [store.ingest.store_hl7(raw=raw, header=read_msh(raw).header()).message_id for raw in _feed()]
        if mode == "one batch":
            map_messages(store, ids)
        else:
            for mid in ids:
                map_messages(store, [mid])
        states.append(_ehr_state(store))
        store.close()
    one, batch = states
    assert one["merged"] and one["observations"] and one["orders"]  # the feed did map something
    assert {state for state, _, _ in one["messages"]} == {"mapped"}
    # as mapped message by message before batches existed: a correction replaces the latest value of its
    # key, rows of one message do not replace each other (a repeated key is told apart by its position:
    # Q6's one value corrects Q4's first, 8.0, not its second), results of a merged patient follow the survivor
    assert [(who, code, value, status, withdrawn) for who, code, _, _, value, status, withdrawn, _, _
            in one["observations"]] == [
        ("A", "101281-4", "7.0", "F", False), ("A", "MS-T25FW", "", "W", True),
        ("NEWP", "101281-4", "14.0", "C", False), ("SURV", "101281-4", "12.0", "C", False),
        ("SURV", "101281-4", "13.0", "C", False), ("SURV", "101281-4", "8.5", "F", False),
        ("SURV", "MS-T25FW", "7.0", "F", False)]
    assert one["studies"] == [("uid0", "SURV"), ("uid1", "SURV"), ("uid2", "NEWP")]
    for key in one:
        assert batch[key] == one[key], key
