"""EHR linking and the feature snapshot (workers/ehr.py, storage/repo_ehr.py): cases that used to give a
patient's model another patient's or a stale value (found in review, 2026-12-07)."""
from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from msgate.hl7.mapping import map_messages
from msgate.hl7.msh import read_msh
from msgate.storage.models import Observation, Study
from msgate.storage.store import Store
from msgate.workers import ehr as ehr_mod

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from test_workers_double import add_patient, make_study  # noqa: E402


def _hl7(store: Store, raw: str) -> None:
    data = raw.replace("\n", "\r").encode()
    stored = store.ingest.store_hl7(raw=data, header=read_msh(data).header())
    outcome = map_messages(store, [stored.message_id])[stored.message_id]
    assert outcome.state == "mapped", outcome


def _obs(store: Store, pid: int, feature: str, code: str, value: str, unit: str, when: datetime) -> None:
    with store.db.session() as s:
        s.add(Observation(patient_id=pid, feature=feature, code=code, code_system="LN",
                          value_enc=store.cipher.encrypt(value, column="observation.value"),
                          value_type="NM", unit=unit, observed_at=when))


def _snap(store: Store, study_id: int):
    with store.db.session() as s:
        study = s.get(Study, study_id)
        link = ehr_mod.link(s, study, store.cipher)
        snap = ehr_mod.snapshot(s, store.cipher, study, link, store.settings.site_zone)
        return link, snap, ehr_mod.vector(snap), ehr_mod.missing(snap)


def test_accession_of_another_patients_order_overrides_the_study_patient(store: Store) -> None:
    # DICOM study: PatientID MRN00001 (no issuer), AccessionNumber ACC00001, StudyDate 20261101.
    study_id, _ = make_study(store, seed=1)
    a = add_patient(store, mrn="MRN00001", nfl=10.0)          # the imaged patient, NfL 10
    # Another patient's order that happens to carry the same accession number (other site / reused number).
    _hl7(store, "MSH|^~\\&|RIS|OTHER|||20261020||OMI^O23^OMI_O23|O1|P|2.5.1\n"
                "PID|1||OTHERMRN^^^OTHER^MR||ROE^RICHARD||19500101|M\n"
                "ORC|NW|PL9|FL9\nOBR|1|PL9|FL9|MR^MRI brain\nIPC|ACC00001|RP1|1.2.3|SPS1|MR\n")
    _hl7(store, "MSH|^~\\&|LAB|OTHER|||20261020||ORU^R01^ORU_R01|R1|P|2.5.1\n"
                "PID|1||OTHERMRN^^^OTHER^MR||ROE^RICHARD||19500101|M\nOBR|1||||||20261015\n"
                "OBX|1|NM|101281-4^NfL^LN||99|pg/mL|||||F|||20261015\n")
    with store.db.session() as s:
        assert s.get(Study, study_id).patient_id == a   # the DICOM identifier already linked it to A
    link, snap, vec, _ = _snap(store, study_id)
    assert link.patient_id == a, f"study of patient {a} linked to patient {link.patient_id}"
    assert snap["nfl"]["value"] == 10.0 and snap["sex"]["value"] == "F"


def test_the_birth_date_beats_an_old_age_observation(store: Store) -> None:
    study_id, _ = make_study(store, seed=2)                       # StudyDate 20261101
    pid = add_patient(store, mrn="MRN00002", birth="19800101")    # 46.8 years at the study
    # An "Age" OBX (LOINC 30525-0) sent with a lab panel ten years earlier; validity is 36500 days.
    _obs(store, pid, "age", "30525-0", "36", "a", datetime(2016, 11, 1, tzinfo=UTC))
    _, snap, vec, _ = _snap(store, study_id)
    assert snap["age"]["value"] > 46, snap["age"]


def test_an_age_observation_is_aged_to_the_study_date(store: Store) -> None:
    study_id, _ = make_study(store, seed=6)                        # StudyDate 20261101
    pid = add_patient(store, mrn="MRN00006", birth=None)          # no birth date in the EHR
    _obs(store, pid, "age", "30525-0", "36", "a", datetime(2016, 11, 1, tzinfo=UTC))
    _, snap, _, _ = _snap(store, study_id)
    assert 45.9 < snap["age"]["value"] < 46.1 and snap["age"]["source"].startswith("observation:"), snap["age"]


def test_value_observed_after_the_study_date_with_offset(store: Store) -> None:
    store.settings.site_timezone = "Europe/Rome"  # the site's StudyDate is local time
    study_id, _ = make_study(store, seed=3)                       # StudyDate 20261101 (local, Italy +0100)
    add_patient(store, mrn="MRN00003", nfl=10.0)                   # 2026-10-01
    _hl7(store, "MSH|^~\\&|LAB|HOSP|||20261102||ORU^R01^ORU_R01|R3|P|2.5.1\n"
                "PID|1||MRN00003||DOE^JANE||19800101|F\nOBR|1\n"
                "OBX|1|NM|101281-4^NfL^LN||99|pg/mL|||||F|||202611020030+0100\n")   # 2 Nov 00:30 local
    _, snap, _, _ = _snap(store, study_id)
    assert snap["nfl"]["value"] == 10.0, f"value observed on 2 Nov (local) used for a 1 Nov study: {snap['nfl']}"


def test_an_order_found_by_accession_alone_links_only_the_images_own_patient(store: Store) -> None:
    """The DICOM identifier linked no patient (no such MRN in the EHR yet), and the newest order with the
    study's accession number belonged to another patient (another facility, a reused number): the case
    ran with that patient's NfL and went out with that patient's order numbers."""
    study_id, _ = make_study(store, seed=11, mrn="IMAGED1")
    _hl7(store, "MSH|^~\\&|RIS|OTHER|||20261020||OMI^O23^OMI_O23|O11|P|2.5.1\n"
                "PID|1||OTHER11^^^OTHER^MR||ROE^RICHARD||19500101|M\n"
                "ORC|NW|PL11|FL11\nOBR|1|PL11|FL11|MR^MRI brain\nIPC|ACC00011|RP1|1.2.3|SPS1|MR\n")
    _hl7(store, "MSH|^~\\&|LAB|OTHER|||20261020||ORU^R01^ORU_R01|R11|P|2.5.1\n"
                "PID|1||OTHER11^^^OTHER^MR||ROE^RICHARD||19500101|M\nOBR|1||||||20261015\n"
                "OBX|1|NM|101281-4^NfL^LN||80|pg/mL|||||F|||20261015\n")
    with store.db.session() as s:
        assert s.get(Study, study_id).patient_id is None  # the order's arrival did not adopt the study
    link, snap, _, missing = _snap(store, study_id)
    assert (link.patient_id, link.order_id) == (None, None) and snap["nfl"] is None and "nfl" in missing


def test_an_order_found_by_accession_links_when_the_mrn_matches_under_another_issuer(store: Store) -> None:
    """The images' PatientID is the order patient's MRN (the feed sends it with its authority, the scanner
    without): the accession's order gives the patient, as before."""
    study_id, _ = make_study(store, seed=12, mrn="IMAGED2")
    _hl7(store, "MSH|^~\\&|RIS|HOSP|||20261020||OMI^O23^OMI_O23|O12|P|2.5.1\n"
                "PID|1||IMAGED2^^^HOSP^MR||DOE^JANE||19800101|F\n"
                "ORC|NW|PL12|FL12\nOBR|1|PL12|FL12|MR^MRI brain\nIPC|ACC00012|RP1|1.2.3|SPS1|MR\n")
    link, _, _, _ = _snap(store, study_id)
    assert link.patient_id is not None and link.order_id is not None
    with store.db.session() as s:
        assert s.get(Study, study_id).patient_id == link.patient_id  # adopted when the order was mapped


def test_a_default_issuer_links_a_scanners_bare_patient_id(tmp_path: Path) -> None:
    """Scanners rarely send IssuerOfPatientID; the feed indexes MRNs under PID-3's assigning authority, so
    a bare PatientID linked to no patient (no order in between) and every case ran without its EHR.
    MSGATE_DICOM__DEFAULT_ISSUER names the authority the scanners' PatientIDs belong to."""
    from msgate.storage.store import open_store
    from tests.conftest import make_settings

    adt = ("MSH|^~\\&|ADT|HOSP|||20261020||ADT^A04|A13|P|2.5.1\nEVN|A04\n"
           "PID|1||MRN00013^^^HOSP^MR||DOE^JANE||19800101|F\n")
    for issuer, linked in (("", False), ("HOSP", True)):
        store = open_store(make_settings(tmp_path / f"home-{issuer or 'none'}", "sqlite",
                                         dicom={"default_issuer": issuer}))
        try:
            _hl7(store, adt)
            study_id, _ = make_study(store, seed=13)  # PatientID MRN00013, no IssuerOfPatientID
            link, _, _, _ = _snap(store, study_id)
            assert (link.patient_id is not None) is linked, (issuer, link)
        finally:
            store.close()


def test_a_lab_value_after_the_run_replans_a_study_linked_through_its_order(store: Store,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The order came first, the images (PatientID without issuer) linked to their patient only through it,
    and the case ran; an NfL that arrived afterwards was never planned in: the scheduler matches changed
    patients by Study.patient_id, which stayed empty. It is recorded when the link is made now."""
    from unittest import mock

    from sqlmodel import select

    from msgate.storage.models import Job
    from msgate.workers.scheduler import Scheduler

    monkeypatch.setattr(Scheduler, "_model_version", lambda self: "v1")
    sched = Scheduler(store, mock.MagicMock())
    _hl7(store, "MSH|^~\\&|RIS|HOSP|||20261020||OMI^O23^OMI_O23|O14|P|2.5.1\n"
                "PID|1||IMAGED14^^^HOSP^MR||DOE^JANE||19800101|F\n"
                "ORC|NW|PL14|FL14\nOBR|1|PL14|FL14|MR^MRI brain\nIPC|ACC00014|RP1|1.2.3|SPS1|MR\n")
    from datetime import timedelta

    from msgate.storage.models import Order, utcnow

    with store.db.session() as s:  # placed hours before the exam
        for order in s.exec(select(Order)).all():
            order.updated_at = utcnow() - timedelta(hours=3)
            s.add(order)
    study_id, _ = make_study(store, seed=14, mrn="IMAGED14")  # arrives after its order
    assert len(sched.scan()) == 1
    _hl7(store, "MSH|^~\\&|LAB|HOSP|||20261101||ORU^R01^ORU_R01|R14|P|2.5.1\n"
                "PID|1||IMAGED14^^^HOSP^MR||DOE^JANE||19800101|F\nOBR|1||||||20261015\n"
                "OBX|1|NM|101281-4^NfL^LN||42|pg/mL|||||F|||20261015\n")
    assert len(sched.scan()) == 1  # planned again with the NfL
    with store.db.session() as s:
        jobs = s.exec(select(Job).where(Job.study_id == study_id)).all()
        assert len(jobs) == 2 and "nfl" not in max(jobs, key=lambda j: j.created_at).flags["ehr_missing"]


def test_a_study_sent_again_for_another_patient_links_that_patient(store: Store) -> None:
    """The PACS corrected a wrong worklist pick (MRN P111 -> P222) and sent the study again: the study row
    kept P111, so the new run used P111's EHR while the SR and ORU named P222."""
    import io

    from pydicom import dcmread
    from sqlmodel import select

    from msgate.storage.models import AuditEvent, Instance

    study_id, _ = make_study(store, seed=15, mrn="P111")
    first = add_patient(store, mrn="P111", nfl=5.0)
    second = add_patient(store, mrn="P222", nfl=50.0)
    assert _snap(store, study_id)[0].patient_id == first
    with store.db.session() as s:
        bodies = [store.blobs.read(s, row.blob_id) for row in s.exec(select(Instance).where(
            Instance.study_id == study_id, Instance.current == True)).all()]  # noqa: E712
    for body in bodies:
        ds = dcmread(io.BytesIO(body))
        ds.PatientID = "P222"
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        assert not store.ingest.store_instance(source=out.getvalue(), calling_aet="PACS").duplicate
    link, snap, _, _ = _snap(store, study_id)
    assert link.patient_id == second and snap["nfl"]["value"] == 50.0
    with store.db.session() as s:
        assert s.exec(select(AuditEvent).where(AuditEvent.kind == "study.reidentified")).first() is not None


def test_the_scheduler_never_records_a_patient_on_a_study_re_identified_meanwhile(store: Store) -> None:
    """The patient found through the order is recorded after planning, in its own transaction; a corrected
    instance that re-identified the study in between (patient cleared, new identifiers) got the old
    patient written back, and every later run used the old patient's EHR."""
    from unittest import mock

    from msgate.workers.scheduler import Scheduler

    study_id, _ = make_study(store, seed=16, mrn="OLD16")
    with store.db.session() as s:
        planned = s.get(Study, study_id)  # the study as the scan planned it
    with store.db.session() as s:  # meanwhile: re-identified to another MRN, patient cleared
        study = s.get(Study, study_id)
        study.dicom_patient_index = store.cipher.blind_index("|NEW16", scope="mrn")
        study.patient_id = None
        s.add(study)
    pid = add_patient(store, mrn="OLD16")
    Scheduler(store, mock.MagicMock())._remember_patients([(planned, pid)])
    with store.db.session() as s:
        assert s.get(Study, study_id).patient_id is None
        current = s.get(Study, study_id)
    Scheduler(store, mock.MagicMock())._remember_patients([(current, pid)])  # planned with today's identity
    with store.db.session() as s:
        assert s.get(Study, study_id).patient_id == pid
