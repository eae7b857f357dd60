"""A series named under another Study Instance UID (a PACS merge or split) moves to that study in the index.

Series UIDs are unique in the index, so the whole series moves: its instance rows (every version), and its
instances off the count of the study it left and onto the new one's. The move is audited ``series.moved``
(internal ids only), the study it left is reopened so it is decided again, and the instance that moved it
names that study (``StoredInstance.moved_from``) for the tracker. Duplicates and journal replays still do
not make new versions, so they move nothing. Before, the instance was filed under the old study's series
and the new study had no series and 0 instances.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlmodel import col, select

from msgate.listener import dataset
from msgate.storage.ingest import Received
from msgate.storage.models import AuditEvent, Instance, Series, Study
from msgate.storage.store import Store, open_store
from tests.conftest import make_settings
from tests.dicom_factory import mr_slice


class _Exam:
    """Study A with a FLAIR series (3 slices) and a T1 series (2 slices), as the PACS first sent it."""

    def __init__(self) -> None:
        self.a, self.b = generate_uid(), generate_uid()
        self.flair, self.t1 = generate_uid(), generate_uid()
        self.sops = {self.flair: [generate_uid() for _ in range(3)], self.t1: [generate_uid() for _ in range(2)]}
        self.made: dict[tuple[str, int, str | None, str | None], bytes] = {}

    def slice(self, series: str, n: int, *, study: str | None = None, sop: str | None = None) -> bytes:
        """The same bytes for the same arguments (mr_slice draws a new Frame of Reference UID each call)."""
        key = (series, n, study, sop)
        if key not in self.made:
            description = "AX FLAIR" if series == self.flair else "T1 MPRAGE"
            accession = "ACC-MOVE-B" if study == self.b else "ACC-MOVE-A"
            self.made[key] = mr_slice(study_uid=study or self.a, series_uid=series, index=n,
                                      sop_uid=sop or self.sops[series][n], description=description,
                                      accession=accession)
        return self.made[key]


def _send(store: Store, exam: _Exam, *, assoc: str) -> None:
    for series, sops in exam.sops.items():
        for n in range(len(sops)):
            store.ingest.store_instance(source=exam.slice(series, n), assoc_id=assoc)


def _index(store: Store) -> tuple[dict[str, Study], dict[str, Series], list[Instance]]:
    """Studies and series by their (decrypted) UIDs, and every instance row."""
    uid = store.cipher.decrypt
    with store.db.session() as session:
        studies = {uid(s.study_uid_enc, column="study.study_uid") or "": s for s in session.exec(select(Study)).all()}
        series = {uid(s.series_uid_enc, column="series.series_uid") or "": s for s in session.exec(select(Series)).all()}
        return studies, series, list(session.exec(select(Instance)).all())


def _moves(store: Store) -> list[AuditEvent]:
    with store.db.session() as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.kind == "series.moved")
                                 .order_by(col(AuditEvent.seq))).all())


def _finish(store: Store, study_id: int, state: str = "ready") -> None:
    with store.db.session() as session:
        study = session.get(Study, study_id)
        assert study is not None
        study.state = state
        session.add(study)


def test_a_series_split_off_moves_whole_with_its_counts(store: Store) -> None:
    exam = _Exam()
    _send(store, exam, assoc="first")
    studies, series, _ = _index(store)
    a = studies[exam.a]
    assert a.id is not None and a.instance_count == 5
    _finish(store, a.id)

    # the PACS moved the T1 series to another study; the first of its slices to arrive moves the series
    first = store.ingest.store_instance(source=exam.slice(exam.t1, 0, study=exam.b), assoc_id="split")
    studies, series, instances = _index(store)
    a, b = studies[exam.a], studies[exam.b]
    t1, flair = series[exam.t1], series[exam.flair]
    assert (first.study_id, first.series_id, first.version, first.moved_from) == (b.id, t1.id, 2, a.id)
    assert (t1.study_id, flair.study_id) == (b.id, a.id)
    assert (a.instance_count, b.instance_count) == (3, 2)
    assert (t1.instance_count, t1.frame_count) == (2, 2)
    assert {i.study_id for i in instances if i.series_id == t1.id} == {b.id}  # every version, the unsent one too
    assert {i.study_id for i in instances if i.series_id == flair.id} == {a.id}
    assert a.state == "receiving"  # reopened: decided again without the T1
    [moved] = _moves(store)
    assert (moved.subject, moved.detail) == (f"series:{t1.id}", {"from_study_id": a.id, "to_study_id": b.id,
                                                                "instances": 2, "frames": 2})
    with store.db.session() as session:
        reopened = session.exec(select(AuditEvent).where(AuditEvent.kind == "study.reopened")).one()
    assert reopened.subject == f"study:{a.id}"

    second = store.ingest.store_instance(source=exam.slice(exam.t1, 1, study=exam.b), assoc_id="split")
    assert (second.study_id, second.moved_from, second.duplicate) == (b.id, None, False)
    again = store.ingest.store_instance(source=exam.slice(exam.t1, 1, study=exam.b), assoc_id="later")
    assert again.duplicate and again.moved_from is None
    studies, series, _ = _index(store)
    assert (studies[exam.a].instance_count, studies[exam.b].instance_count, series[exam.t1].instance_count) == \
        (3, 2, 2)
    assert len(_moves(store)) == 1


def test_a_first_instance_under_another_study_moves_its_series_and_is_counted_there(store: Store) -> None:
    exam = _Exam()
    _send(store, exam, assoc="first")
    extra = store.ingest.store_instance(source=exam.slice(exam.flair, 3, study=exam.b, sop=generate_uid()),
                                        assoc_id="new")
    studies, series, _ = _index(store)
    a, b, flair = studies[exam.a], studies[exam.b], series[exam.flair]
    assert (extra.version, extra.moved_from, extra.study_id, flair.study_id) == (1, a.id, b.id, b.id)
    assert (a.instance_count, b.instance_count, flair.instance_count, flair.frame_count) == (2, 4, 4, 4)


def test_a_journal_replay_of_the_first_delivery_does_not_move_the_series_back(store: Store) -> None:
    exam = _Exam()
    _send(store, exam, assoc="first")
    for series_uid, sops in exam.sops.items():
        for n in range(len(sops)):
            store.ingest.store_instance(source=exam.slice(series_uid, n, study=exam.b), assoc_id="merged")
    for series_uid, sops in exam.sops.items():  # the first association's records, indexed again after a crash
        for n in range(len(sops)):
            replay = store.ingest.store_instance(source=exam.slice(series_uid, n), assoc_id="first")
            assert replay.duplicate and replay.moved_from is None
    studies, series, instances = _index(store)
    b = studies[exam.b]
    assert {s.study_id for s in series.values()} == {b.id}
    assert (studies[exam.a].instance_count, b.instance_count) == (0, 5)
    assert sorted(i.version for i in instances) == [1] * 5 + [2] * 5
    assert len(_moves(store)) == 2


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    st = open_store(make_settings(tmp_path / "home", "sqlite"))  # file bodies: one group commit per batch
    yield st
    st.close()


def test_one_batch_that_names_the_series_under_both_studies_files_it_under_the_last(sqlite_store: Store) -> None:
    store, exam = sqlite_store, _Exam()
    _send(store, exam, assoc="first")
    assert store.ingest.can_group_commit
    raws = [exam.slice(exam.flair, 3, sop=generate_uid()),  # one more slice under study A, then the merge
            exam.slice(exam.flair, 0, study=exam.b), exam.slice(exam.flair, 4, study=exam.b, sop=generate_uid())]
    results = store.ingest.index_received([Received(r, dataset.parse(r), "PACS", "batch") for r in raws])
    studies, series, instances = _index(store)
    a, b, flair = studies[exam.a], studies[exam.b], series[exam.flair]
    assert [(r.study_id, r.moved_from) for r in results] == [(b.id, None), (b.id, a.id), (b.id, None)]  # type: ignore[union-attr]
    assert flair.study_id == b.id and {i.study_id for i in instances if i.series_id == flair.id} == {b.id}
    assert (a.instance_count, b.instance_count, flair.instance_count) == (2, 5, 5)
    [moved] = _moves(store)
    assert moved.detail["instances"] == 4  # the 3 stored before and the one counted earlier in this batch


def test_a_job_of_the_study_a_series_left_does_not_read_it(store: Store) -> None:
    """A job planned for study A before the PACS moved its T1 to study B must not read the T1 (now B's) and
    publish it under A's accession: it ends empty_series instead."""
    from msgate.errors import Rejected
    from msgate.workers import case

    exam = _Exam()
    _send(store, exam, assoc="first")
    _, series, _ = _index(store)
    t1_id, flair_id = series[exam.t1].id, series[exam.flair].id
    assert t1_id is not None and flair_id is not None
    a_id = _index(store)[0][exam.a].id
    assert a_id is not None
    read, _ = case._instances(store, {"FLAIR": flair_id, "T1": t1_id}, a_id, with_ehr=False)
    assert (len(read["FLAIR"]), len(read["T1"])) == (3, 2)
    store.ingest.store_instance(source=exam.slice(exam.t1, 0, study=exam.b), assoc_id="split")
    with pytest.raises(Rejected) as raised:
        case._instances(store, {"FLAIR": flair_id, "T1": t1_id}, a_id, with_ehr=False)
    assert raised.value.code == "empty_series"
