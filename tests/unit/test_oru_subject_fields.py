"""What the outgoing ORU^R01 says about its subject and itself (review 2026-12-10):

- PID-3 carries the assigning authority of the EHR patient the study is linked to (CX.4, type CX.5 from the
  stored identifier); without a linked patient, IssuerOfPatientID, then ``dicom.default_issuer``;
- ORC-2/3 and OBR-2/3 carry the order's whole EI (namespace, universal id and its type) as the order feed
  sent it; orders stored before migration 0008 have only EI.1;
- OBR-4 and MSH-11 come from ``hl7_out`` settings;
- a result re-sent after this change is not taken for one that moved to another patient or order.

On the embedded SQLite store and the machine's PostgreSQL (where a store is used).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset
from sqlalchemy import inspect, text
from sqlmodel import select

from msgate.config import load_settings
from msgate.errors import ConfigError
from msgate.hl7.mapping import map_messages
from msgate.hl7.msh import read_msh
from msgate.results import hl7_out
from msgate.storage.models import Order, Series, Study
from msgate.storage.store import Store, open_store
from tests.conftest import make_settings
from tests.integration.pacs_peers import encode, flair_series, model_result

RESULT = model_result((12, 40, 48))
ORDER = ("MSH|^~\\&|RIS|HOSP|||20261020||OMI^O23^OMI_O23|{cid}|P|2.5.1\r"
         "PID|1||{pid}||DOE^JANE||19800101|F\r"
         "ORC|NW|{placer}|{filler}\rOBR|1|{placer}|{filler}|MR^MRI brain\rIPC|ACC-R-1|RP1|1.2.3|SPS1|MR\r")


def _source(**attrs: object) -> Dataset:
    ds = copy.deepcopy(_SOURCE)
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


_SOURCE = flair_series(n=1, rows=8, cols=8)[0]  # PatientID MRN-R-1, IssuerOfPatientID HOSP, accession ACC-R-1


def _render(source: Dataset, numbers: hl7_out.OrderNumbers | None = None, **settings: object) -> str:
    loaded = load_settings(home=Path("/nonexistent"), **{"hl7_out": {"port": 2576}, **settings})  # type: ignore[arg-type]
    numbers = numbers or hl7_out.OrderNumbers("P1", "F1", "ACC-R-1")
    er7 = hl7_out.render_oru(RESULT, source=source, numbers=numbers, sr_uid="1.2.3.4", correction=False,
                             settings=loaded)
    parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()
    return er7


def _seg(er7: str, name: str) -> list[str]:
    return next(line for line in er7.split("\r") if line.startswith(name)).split("|")


# --- PID-3 without a linked patient --------------------------------------------------------------------


def test_the_default_issuer_is_the_authority_of_a_bare_patient_id() -> None:
    """The study was linked under HOSP|MRN-R-1 (the default issuer) and the ORU said ``MRN-R-1^^^^MR``."""
    bare = _source(IssuerOfPatientID=None)
    assert _seg(_render(bare, dicom={"default_issuer": "HOSP"}), "PID")[3] == "MRN-R-1^^^HOSP^MR"
    assert _seg(_render(bare), "PID")[3] == "MRN-R-1^^^^MR"  # no authority known anywhere: none sent


def test_an_issuer_the_images_send_beats_the_default_issuer() -> None:
    assert _seg(_render(_source(IssuerOfPatientID="RAD"), dicom={"default_issuer": "HOSP"}), "PID")[3] == \
        "MRN-R-1^^^RAD^MR"
    qualifier = Dataset()
    qualifier.UniversalEntityID, qualifier.UniversalEntityIDType = "1.2.250.1.71", "ISO"
    only_qualified = _source(IssuerOfPatientID=None, IssuerOfPatientIDQualifiersSequence=[qualifier])
    assert _seg(_render(only_qualified, dicom={"default_issuer": "HOSP"}), "PID")[3] == \
        "MRN-R-1^^^&1.2.250.1.71&ISO^MR"


def test_a_linked_patients_identifier_is_sent_as_stored() -> None:
    linked = hl7_out.OrderNumbers("P1", "F1", "ACC-R-1", patient=hl7_out.LinkedId("MRN-R-1", "HOSP", "PI"))
    assert _seg(_render(_source(IssuerOfPatientID=None), linked), "PID")[3] == "MRN-R-1^^^HOSP^PI"
    oid = hl7_out.OrderNumbers("P1", "F1", "ACC-R-1",
                               patient=hl7_out.LinkedId("A^1", "2.16.840.1.113883.19.5"))
    assert _seg(_render(_source(), oid), "PID")[3] == "A\\S\\1^^^&2.16.840.1.113883.19.5&ISO^MR"


# --- order numbers ----------------------------------------------------------------------------------------


def test_order_numbers_go_out_with_their_namespace() -> None:
    numbers = hl7_out.OrderNumbers("12345", "F1", "ACC-R-1", placer_authority=("EPIC",),
                                   filler_authority=("RIS", "1.2.3.4", "ISO"))
    er7 = _render(_source(), numbers)
    orc, obr = _seg(er7, "ORC"), _seg(er7, "OBR")
    assert (orc[2], orc[3]) == ("12345^EPIC", "F1^RIS^1.2.3.4^ISO")
    assert (obr[2], obr[3], obr[18]) == ("12345^EPIC", "F1^RIS^1.2.3.4^ISO", "ACC-R-1")


def test_namespace_delimiters_are_escaped_and_a_namespace_too_long_for_ei2_is_not_refused() -> None:
    numbers = hl7_out.OrderNumbers("1&2", "F1", "ACC-R-1", placer_authority=("A^B",),
                                   filler_authority=("N" * 21,))
    er7 = _render(_source(), numbers)  # strictly valid (EI.2 is an IS of at most 20 characters)
    assert _seg(er7, "ORC")[2] == "1\\T\\2^A\\S\\B"
    assert _seg(er7, "ORC")[3] == f"F1^^{'N' * 21}^L"


@pytest.fixture
def hstore(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Store:
    pg = request.getfixturevalue("pg_url") if backend == "postgres" else None
    home = tmp_path / "home"
    if backend == "postgres":
        from msgate.storage import keyring

        keyring.init(home / "keys" / "keyring.json")
    st = open_store(make_settings(home, backend, pg, dicom={"default_issuer": "HOSP"},
                                  hl7_out={"port": 2576}))
    request.addfinalizer(st.close)
    return st


def _hl7(store: Store, raw: str) -> None:
    data = raw.encode()
    stored = store.ingest.store_hl7(raw=data, header=read_msh(data).header())
    assert map_messages(store, [stored.message_id])[stored.message_id].state == "mapped"


def _study(store: Store, **attrs: object) -> tuple[int, Dataset]:
    sources = flair_series(n=2, rows=8, cols=8, seed=3)
    for ds in sources:
        for key, value in attrs.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
        store.ingest.store_instance(source=encode(ds))
    with store.db.session() as session:
        series = session.exec(select(Series)).one()
        return series.study_id, sources[0]


def _numbers(store: Store, study_id: int, source: Dataset) -> hl7_out.OrderNumbers:
    with store.db.session() as session:
        study = session.get(Study, study_id)
        assert study is not None
        return hl7_out.order_numbers(session, store.cipher, study=study, source=source)


def test_the_oru_names_the_linked_patient_and_the_order_as_the_feed_sent_them(hstore: Store) -> None:
    """default_issuer HOSP, images without IssuerOfPatientID: linked to patient HOSP|MRN-R-1; the order
    ``12345^EPIC`` went out as ``12345``."""
    study_id, source = _study(hstore, IssuerOfPatientID=None)
    _hl7(hstore, ORDER.format(cid="O1", pid="MRN-R-1^^^HOSP^MR", placer="12345^EPIC",
                              filler="F77^RIS^1.2.3.4^ISO"))
    numbers = _numbers(hstore, study_id, source)
    assert numbers.patient == hl7_out.LinkedId("MRN-R-1", "HOSP", "MR")
    er7 = hl7_out.render_oru(RESULT, source=source, numbers=numbers, sr_uid="1.2.3.4", correction=False,
                             settings=hstore.settings)
    assert _seg(er7, "PID")[3] == "MRN-R-1^^^HOSP^MR"
    assert (_seg(er7, "ORC")[2], _seg(er7, "ORC")[3]) == ("12345^EPIC", "F77^RIS^1.2.3.4^ISO")
    assert (_seg(er7, "OBR")[2], _seg(er7, "OBR")[3]) == ("12345^EPIC", "F77^RIS^1.2.3.4^ISO")
    with hstore.db.session() as session:  # the namespace is stored encrypted, never in the clear
        order = session.exec(select(Order)).one()
        assert order.placer_authority_enc is not None and b"EPIC" not in order.placer_authority_enc


def test_a_patient_linked_through_its_order_is_named_with_its_own_authority(tmp_path: Path) -> None:
    """No issuer anywhere on the DICOM side; the accession's order gives the patient, whose MRN the feed
    sends under HOSP: the ORU names HOSP, the EHR's key for that patient."""
    store = open_store(make_settings(tmp_path / "home", "sqlite", hl7_out={"port": 2576}))
    try:
        study_id, source = _study(store, IssuerOfPatientID=None)
        _hl7(store, ORDER.format(cid="O2", pid="MRN-R-1^^^HOSP^MR~ACCT9^^^HOSP^AN", placer="P9", filler="F9"))
        numbers = _numbers(store, study_id, source)
        assert numbers.patient == hl7_out.LinkedId("MRN-R-1", "HOSP", "MR")
        assert (numbers.placer, numbers.placer_authority) == ("P9", ())
    finally:
        store.close()


def test_an_unlinked_study_falls_back_to_the_images(hstore: Store) -> None:
    study_id, source = _study(hstore, IssuerOfPatientID=None)
    numbers = _numbers(hstore, study_id, source)
    assert numbers.patient is None and numbers.placer == numbers.filler == "ACC-R-1"
    er7 = hl7_out.render_oru(RESULT, source=source, numbers=numbers, sr_uid="1.2.3.4", correction=False,
                             settings=hstore.settings)
    assert _seg(er7, "PID")[3] == "MRN-R-1^^^HOSP^MR"  # the default issuer, as the study was indexed


def test_an_order_update_without_a_namespace_replaces_the_stored_one(hstore: Store) -> None:
    """The namespace belongs to the number it came with: a placer number replaced (the order found by its
    filler) takes its own namespace, or none."""
    study_id, source = _study(hstore)
    _hl7(hstore, ORDER.format(cid="O3", pid="MRN-R-1^^^HOSP^MR", placer="P1^EPIC", filler="F1^RIS"))
    _hl7(hstore, ORDER.format(cid="O4", pid="MRN-R-1^^^HOSP^MR", placer="P2", filler="F1^RIS"))
    numbers = _numbers(hstore, study_id, source)
    assert (numbers.placer, numbers.placer_authority, numbers.filler, numbers.filler_authority) == \
        ("P2", (), "F1", ("RIS",))


def _downgrade(store: Store, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    from msgate.storage.db import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with store.db.connect() as conn, conn.begin():
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def _order_columns(store: Store) -> set[str]:
    with store.db.connect() as conn:
        return {c["name"] for c in inspect(conn).get_columns("order_")}


def test_migration_0008_adds_the_namespace_columns_and_old_orders_go_out_bare(hstore: Store) -> None:
    """Orders stored before 0008 kept no namespace: their ORU carries EI.1 alone, as before."""
    study_id, source = _study(hstore)
    _hl7(hstore, ORDER.format(cid="O5", pid="MRN-R-1^^^HOSP^MR", placer="12345^EPIC", filler="F5^RIS"))
    assert {"placer_authority_enc", "filler_authority_enc"} <= _order_columns(hstore)
    _downgrade(hstore, "0007")
    assert hstore.db.current_revision() == "0007"
    assert not {"placer_authority_enc", "filler_authority_enc"} & _order_columns(hstore)
    with hstore.db.connect() as conn:  # the order itself is kept
        kept = conn.execute(text("SELECT count(*) FROM order_ WHERE placer_enc IS NOT NULL")).scalar_one()
    assert kept == 1
    hstore.db.upgrade("0008")
    assert hstore.db.current_revision() == "0008"
    numbers = _numbers(hstore, study_id, source)
    assert (numbers.placer, numbers.placer_authority, numbers.filler, numbers.filler_authority) == \
        ("12345", (), "F5", ())
    er7 = hl7_out.render_oru(RESULT, source=source, numbers=numbers, sr_uid="1.2.3.4", correction=False,
                             settings=hstore.settings)
    assert (_seg(er7, "ORC")[2], _seg(er7, "OBR")[3]) == ("12345", "F5")


def test_a_stored_namespace_that_does_not_decode_is_left_out(hstore: Store) -> None:
    study_id, source = _study(hstore)
    _hl7(hstore, ORDER.format(cid="O6", pid="MRN-R-1^^^HOSP^MR", placer="P6^EPIC", filler="F6"))
    with hstore.db.session() as session:
        order = session.exec(select(Order)).one()
        order.placer_authority_enc = hstore.cipher.encrypt(json.dumps({"not": "a list"}),
                                                           column="order.placer_authority")
        session.add(order)
    assert _numbers(hstore, study_id, source).placer_authority == ()


# --- OBR-4 and MSH-11 -----------------------------------------------------------------------------------


def test_obr4_comes_from_the_settings() -> None:
    assert _seg(_render(_source()), "OBR")[4] == "MSAI^MS MRI AI analysis^L"
    er7 = _render(_source(), hl7_out={"port": 2576, "service_code": "RAD123",
                                      "service_text": "MRI brain & AI", "service_coding_system": "99HOSP"})
    assert _seg(er7, "OBR")[4] == "RAD123^MRI brain \\T\\ AI^99HOSP"


@pytest.mark.parametrize("bad", [{"service_code": ""}, {"service_code": "A^B"}, {"service_code": "X" * 21},
                                 {"service_coding_system": ""}, {"service_coding_system": "L|"},
                                 {"service_text": "&" * 67}])
def test_invalid_service_settings_are_refused_by_name(bad: dict[str, str]) -> None:
    key = next(iter(bad))
    good = {"service_code": "RAD1", "service_coding_system": "99HOSP", "service_text": "MRI & AI"}[key]
    loaded = load_settings(home=Path("/nonexistent"), hl7_out={"port": 2576, key: good}).hl7_out
    assert getattr(loaded, key) == good
    with pytest.raises(ConfigError, match=f"MSGATE_HL7_OUT__{key.upper()}"):
        load_settings(home=Path("/nonexistent"), hl7_out={"port": 2576, **bad})


def test_msh11_comes_from_the_settings() -> None:
    assert _seg(_render(_source()), "MSH")[10] == "P"
    assert _seg(_render(_source(), hl7_out={"port": 2576, "processing_id": "t"}), "MSH")[10] == "T"
    assert _seg(_render(_source(), hl7_out={"port": 2576, "processing_id": "D^T"}), "MSH")[10] == "D^T"


@pytest.mark.parametrize("bad", ["", "X", "PT", "P^X", "P^T^A", "T^"])
def test_a_processing_id_outside_table_0103_is_refused(bad: str) -> None:
    for good, stored in (("p", "P"), ("T^I", "T^I"), ("D^A", "D^A"), (" P^T ", "P^T")):
        loaded = load_settings(home=Path("/nonexistent"),
                               hl7_out={"port": 2576, "processing_id": good}).hl7_out
        assert loaded is not None and loaded.processing_id == stored
    with pytest.raises(ConfigError, match="MSGATE_HL7_OUT__PROCESSING_ID"):
        load_settings(home=Path("/nonexistent"), hl7_out={"port": 2576, "processing_id": bad})


# --- the same subject before and after this change ------------------------------------------------------


def test_an_oru_sent_before_authorities_and_namespaces_is_the_same_subject() -> None:
    """A correction after the upgrade: the earlier ORU said ``MRN-R-1^^^^MR`` and ``12345``, this one
    ``MRN-R-1^^^HOSP^MR`` and ``12345^EPIC``. Taken as moved, the patient's own result would be withdrawn as
    sent for the wrong patient."""
    bare = _source(IssuerOfPatientID=None)
    before = _render(bare, hl7_out.OrderNumbers("12345", "F1", "ACC-R-1"))
    after = _render(bare, hl7_out.OrderNumbers("12345", "F1", "ACC-R-1", placer_authority=("EPIC",),
                                               patient=hl7_out.LinkedId("MRN-R-1", "HOSP")))
    assert not hl7_out.moved(before, after)
    other_ns = _render(bare, hl7_out.OrderNumbers("12345", "F1", "ACC-R-1", placer_authority=("CERNER",),
                                                  patient=hl7_out.LinkedId("MRN-R-1", "HOSP")))
    assert hl7_out.moved(after, other_ns)  # another system's order 12345
    other_issuer = _render(bare, hl7_out.OrderNumbers("12345", "F1", "ACC-R-1", placer_authority=("EPIC",),
                                                      patient=hl7_out.LinkedId("MRN-R-1", "CLINIC")))
    assert hl7_out.moved(after, other_issuer)  # another authority's MRN-R-1
    other_mrn = _render(_source(PatientID="MRN-R-2", IssuerOfPatientID=None), hl7_out.OrderNumbers(
        "12345", "F1", "ACC-R-1"))
    assert hl7_out.moved(before, other_mrn)


# --- review 2026-12-11: the same patient written two ways; escaped lengths; control characters -----------


def _qualified(universal_id: str = "1.2.3.4", universal_type: str = "ISO", **attrs: object) -> Dataset:
    qualifier = Dataset()
    qualifier.UniversalEntityID, qualifier.UniversalEntityIDType = universal_id, universal_type
    return _source(IssuerOfPatientIDQualifiersSequence=[qualifier], **attrs)


def test_an_oru_sent_with_the_images_qualifiers_then_linked_is_the_same_patient() -> None:
    """The first ORU went out before the ADT with ``HOSP&1.2.3.4&ISO`` (IssuerOfPatientID and its
    qualifiers); the correction after linking names the EHR identifier, stored as ``HOSP`` (or, when the
    feed sent HD.2 only, ``1.2.3.4``). Taken as moved, the patient's own result was withdrawn from their
    chart as "sent for the wrong patient"."""
    before = _render(_qualified())
    assert _seg(before, "PID")[3] == "MRN-R-1^^^HOSP&1.2.3.4&ISO^MR"
    for stored in ("HOSP", "1.2.3.4"):
        after = _render(_qualified(), hl7_out.OrderNumbers("P1", "F1", "ACC-R-1",
                                                           patient=hl7_out.LinkedId("MRN-R-1", stored)))
        assert not hl7_out.moved(before, after), stored
        assert not hl7_out.moved(after, before), stored
    # an issuer name too long for HD.1 is left out beside the qualifiers, and goes into HD.2 as a local name
    # when the EHR identifier is sent: an ISO universal id and a local name are not compared
    long_name = "RADIOLOGY-NORTH-CAMPUS"
    first = _render(_qualified(IssuerOfPatientID=long_name))
    linked = _render(_source(), hl7_out.OrderNumbers("P1", "F1", "ACC-R-1",
                                                     patient=hl7_out.LinkedId("MRN-R-1", long_name)))
    assert (_seg(first, "PID")[3], _seg(linked, "PID")[3]) == \
        ("MRN-R-1^^^&1.2.3.4&ISO^MR", f"MRN-R-1^^^&{long_name}&L^MR")
    assert not hl7_out.moved(first, linked)


def test_another_authority_in_the_same_part_is_still_a_move() -> None:
    before = _render(_qualified())
    for other in (_render(_qualified("1.2.3.5")),  # HD.2 vs HD.2 of the same type
                  _render(_qualified(IssuerOfPatientID="CLINIC")),  # HD.1 vs HD.1
                  _render(_source(), hl7_out.OrderNumbers("P1", "F1", "ACC-R-1",
                                                          patient=hl7_out.LinkedId("MRN-R-1", "CLINIC"))),
                  _render(_qualified(PatientID="MRN-R-2"))):
        assert hl7_out.moved(before, other)
        assert hl7_out.moved(other, before)
    ns = _render(_source(), hl7_out.OrderNumbers("P1", "F1", "ACC-R-1",
                                                 placer_authority=("EPIC", "1.2.3", "ISO")))
    assert not hl7_out.moved(ns, _render(_source(), hl7_out.OrderNumbers("P1", "F1", "ACC-R-1",
                                                                         placer_authority=("EPIC",))))
    assert hl7_out.moved(ns, _render(_source(), hl7_out.OrderNumbers(
        "P1", "F1", "ACC-R-1", placer_authority=("", "1.2.4", "ISO"))))  # EI.3 vs EI.3


def test_the_patient_and_order_the_jobs_named_decide_over_the_text() -> None:
    """Where both jobs know the EHR patient (and order) their ORU named, those decide: the same patient
    written two ways is not moved, another patient whose identifier reads the same (two facilities' MRN-R-1
    sent without an authority) is."""
    before = _render(_qualified())
    after = _render(_qualified(PatientID="MRN-R-2"))
    same, other = hl7_out.Subject(patient=7, order=3), hl7_out.Subject(patient=8, order=3)
    assert hl7_out.moved(before, after) and not hl7_out.moved(before, after, same, same)
    assert hl7_out.moved(before, before, same, other)
    assert hl7_out.moved(before, before, same, hl7_out.Subject(patient=7, order=4))  # another order
    unknown = hl7_out.Subject(patient=None, order=None)  # not linked when it was sent: the text decides
    assert hl7_out.moved(before, after, unknown, same) and not hl7_out.moved(before, before, unknown, same)


def test_a_job_subject_resolves_a_merged_patient_to_its_survivor(hstore: Store) -> None:
    from msgate.storage.models import Patient

    with hstore.db.session() as session:
        survivor, retired = Patient(), Patient()
        session.add_all([survivor, retired])
        session.flush()
        retired.merged_into_id = survivor.id
        session.add(retired)
        session.flush()
        assert hl7_out.job_subject(session, {"patient_id": retired.id, "order_id": 5}) == \
            hl7_out.Subject(patient=survivor.id, order=5)
        # what the ORU named when it was rendered beats what the job was planned with
        assert hl7_out.job_subject(session, {"patient_id": 99, "order_id": None,
                                             "oru_subject": {"patient": retired.id, "order": None}}) == \
            hl7_out.Subject(patient=survivor.id, order=None)
        assert hl7_out.job_subject(session, {}) == hl7_out.Subject()
        assert hl7_out.job_subject(session, {"patient_id": 12345}) == hl7_out.Subject(patient=12345)


def test_escaped_lengths_decide_where_a_namespace_goes() -> None:
    """A 19-character namespace with ``&`` is 21 characters escaped: it failed STRICT (MaxLengthReached) and
    the whole ORU was left out. Now it goes into EI.3 as a local identifier, as an over-long one does."""
    ns = "A&" + "B" * 17
    er7 = _render(_source(), hl7_out.OrderNumbers("P1", "F1", "ACC-R-1", placer_authority=(ns,)))
    assert _seg(er7, "ORC")[2] == f"P1^^A\\T\\{'B' * 17}^L"
    beside = _render(_source(), hl7_out.OrderNumbers("P1", "F1", "ACC-R-1",
                                                     placer_authority=(ns, "1.2.3", "ISO")))
    assert _seg(beside, "ORC")[2] == "P1^^1.2.3^ISO"
    fits = "A&" + "B" * 16  # 20 escaped
    assert _seg(_render(_source(), hl7_out.OrderNumbers("P1", "F1", "ACC-R-1", placer_authority=(fits,))),
                "ORC")[2] == f"P1^A\\T\\{'B' * 16}"
    issuer = _render(_source(IssuerOfPatientID=ns))
    assert _seg(issuer, "PID")[3] == f"MRN-R-1^^^&A\\T\\{'B' * 17}&L^MR"


def test_an_over_long_universal_id_or_type_is_left_out_and_the_oru_stays_valid() -> None:
    """EI.3/HD.2 are ST (199 characters), EI.4/HD.3 ID from table 0301 (6 characters: ``Random``)."""
    long_uid = "urn:" + "x" * 196
    numbers = hl7_out.OrderNumbers("P1", "F1", "ACC-R-1", placer_authority=("EPIC", long_uid, "URI"),
                                   filler_authority=("", long_uid, "URI"))
    er7 = _render(_source(), numbers)
    assert (_seg(er7, "ORC")[2], _seg(er7, "ORC")[3]) == ("P1^EPIC", "F1")  # as orders before 0008
    escaped_over = "1.2&" + "3" * 194  # 198 characters, 200 escaped
    assert _seg(_render(_source(), hl7_out.OrderNumbers("P1", "F1", "ACC-R-1", placer_authority=(
        "EPIC", escaped_over, "L"))), "ORC")[2] == "P1^EPIC"
    typed = _render(_source(), hl7_out.OrderNumbers("P1", "F1", "ACC-R-1", placer_authority=(
        "EPIC", "1.2.3", "NOT-A-TYPE"), filler_authority=("RIS", "1.2.4", "Random")))
    assert (_seg(typed, "ORC")[2], _seg(typed, "ORC")[3]) == ("P1^EPIC^1.2.3", "F1^RIS^1.2.4^Random")
    # PID-3: a universal id too long beside the issuer is left out; a type that is not one is not sent
    assert _seg(_render(_qualified(long_uid, "URI")), "PID")[3] == "MRN-R-1^^^HOSP^MR"
    assert _seg(_render(_qualified("1.2.3.4", "NOTATYPE")), "PID")[3] == "MRN-R-1^^^HOSP&1.2.3.4&L^MR"


def test_a_patient_authority_that_fits_nowhere_refuses_the_oru_instead_of_dropping_it() -> None:
    """Without the images' issuer, qualifiers whose universal id is too long for HD.2 are the only
    authority: sent without it, an engine could file the result under another facility's MRN-R-1."""
    from msgate.errors import Rejected

    with pytest.raises(Rejected) as refused:
        _render(_qualified("urn:" + "x" * 196, "URI", IssuerOfPatientID=None))
    assert refused.value.code == "oru_invalid"


@pytest.mark.parametrize("where", ["patient_name", "patient_id", "placer", "namespace", "accession"])
def test_a_line_break_in_a_value_is_escaped_not_a_segment_end(where: str) -> None:
    """msgate's own HL7 parser reads ``\\X0D\\`` and ``\\.br\\`` into values, and DICOM text may carry a CR
    or LF: placed as they were, they ended the segment and the rest became a bogus one."""
    from msgate.hl7.parse import parse

    source = _source(**{"patient_name": {"PatientName": "DOE\r\nZZZ|1^X"},
                        "patient_id": {"PatientID": "MRN\r1"}, "accession": {"AccessionNumber": "ACC\n1"}}
                     .get(where, {}))
    numbers = hl7_out.OrderNumbers("P\n1" if where == "placer" else "P1", "F1", source.AccessionNumber,
                                   placer_authority=("EP\rIC",) if where == "namespace" else ())
    er7 = _render(source, numbers)
    lines = er7.split("\r")
    assert [line[:3] for line in lines if line][:4] == ["MSH", "PID", "ORC", "OBR"]
    assert "\n" not in er7 and all(line[:3].isalpha() and line[3] == "|" for line in lines if line)
    assert "\\X0D\\" in er7 or "\\X0A\\" in er7  # hexadecimal data (v2.5.1 §2.7.4), not \E\X0D\E\
    assert "\\E\\X0" not in er7 and er7.isascii() and "UNICODE" not in er7  # no stand-in left
    parsed = parse(er7.encode())
    pid, orc, obr = parsed.first("PID"), parsed.first("ORC"), parsed.first("OBR")
    assert pid is not None and orc is not None and obr is not None
    got = {"patient_name": pid.get(5, 1), "patient_id": pid.get(3, 1), "placer": orc.get(2, 1),
           "namespace": orc.get(2, 2), "accession": obr.get(18)}[where]
    assert got == {"patient_name": "DOE\r\nZZZ|1", "patient_id": "MRN\r1", "placer": "P\n1",
                   "namespace": "EP\rIC", "accession": "ACC\n1"}[where]


@pytest.mark.parametrize("key", ["service_text", "receiving_application", "receiving_facility"])
@pytest.mark.parametrize("bad", ["MRI\rOBX|1|ST", "MRI\nAI", "MRI\x0bAI", "MRI\x1cAI"])
def test_control_characters_in_oru_text_settings_are_refused(key: str, bad: str) -> None:
    with pytest.raises(ConfigError, match=f"MSGATE_HL7_OUT__{key.upper()}"):
        load_settings(home=Path("/nonexistent"), hl7_out={"port": 2576, key: bad})


@pytest.mark.parametrize("key", ["sending_application", "sending_facility"])
@pytest.mark.parametrize("bad", ["MSGATE\rOBX|1|ST", "MS\nGATE", "MS\x1cGATE"])
def test_control_characters_in_the_sending_identity_are_refused(key: str, bad: str) -> None:
    """MSH-3/4 of the ORU (and of every ACK) are set as they are: a line break would end MSH."""
    with pytest.raises(ConfigError, match=f"MSGATE_HL7__{key.upper()}"):
        load_settings(home=Path("/nonexistent"), hl7={key: bad})
