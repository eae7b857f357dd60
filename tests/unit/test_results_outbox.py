"""Outbox state machine and publish_job on the real store (SQLite, and PostgreSQL when marked), no sockets."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlmodel import col, select
from typer.testing import CliRunner

from msgate.cli import outbox_cmd
from msgate.cli.common import State
from msgate.results import codes, outbox, outbox_ops, outbox_send
from msgate.results.publish import publish_job
from msgate.storage.models import AuditEvent, Blob, Job, OutboxAttempt, OutboxEntry, Series, Study, utcnow
from msgate.storage.store import Store, open_store
from msgate.workers.results_io import store_result
from tests.conftest import make_settings
from tests.integration.pacs_peers import encode, flair_series, model_result

POLICY = outbox.Policy(base_delay=4, max_delay=3600, max_age=3600, lease=60)


@pytest.fixture
def rstore(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Iterator[Store]:
    pg = request.getfixturevalue("pg_url") if backend == "postgres" else None
    home = tmp_path / "home"
    if backend == "postgres":
        from msgate.storage import keyring

        keyring.init(home / "keys" / "keyring.json")
    settings = make_settings(home, backend, pg, hl7_out={"port": 2599},
                             pacs=[{"name": "pacs-a", "port": 11999}, {"name": "pacs-b", "port": 11998}])
    st = open_store(settings)
    yield st
    st.close()


def _job(store: Store, *, with_flair: bool = False, supersedes: str | None = None, idem: str = "k1",
         strip: tuple[str, ...] = ()) -> str:
    if with_flair:
        for ds in flair_series(n=12, rows=40, cols=48, seed=5, study_uid="1.2.826.0.1.3680043.8.498.1"):
            for keyword in strip:
                delattr(ds, keyword)
            store.ingest.store_instance(source=encode(ds))
    with store.db.session() as session:
        series = session.exec(select(Series)).first()
        if series is not None:
            series.role = "FLAIR"
            session.add(series)
            study_id = series.study_id
        else:
            study = Study(study_uid_index=f"idx-{idem}")
            session.add(study)
            session.flush()
            assert study.id is not None
            study_id = study.id
        job = Job(study_id=study_id, idem_key=idem, state="done", supersedes_id=supersedes)
        session.add(job)
        session.flush()
        return job.id


def _state_job(store: Store, job_id: str) -> Job:
    with store.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_a_publish_refused_for_good_is_recorded_on_the_job(rstore: Store) -> None:
    from msgate.errors import Rejected
    from msgate.results import tasks
    from msgate.results.tasks import PUBLISH_TASK
    from msgate.workers.celery_app import build_app

    job_id = _job(rstore)  # no stored result
    tasks.use_store(rstore)
    try:
        with pytest.raises(Rejected):
            build_app(rstore.settings).tasks[PUBLISH_TASK].run(job_id)
    finally:
        tasks.use_store(None)
    assert _state_job(rstore, job_id).flags["publish_error"] == "no_result"


def test_a_publish_that_fails_unexpectedly_is_recorded_on_the_job(rstore: Store,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Not Rejected, not Transient (a defect): it failed once and left no trace on the job, so neither
    `jobs show` nor `status` said why the study never got its SR and ORU."""
    from msgate.results import tasks
    from msgate.results.tasks import PUBLISH_TASK
    from msgate.workers.celery_app import build_app

    def broken(store: Store, job_id: str) -> str:
        raise AttributeError("'FileDataset' object has no attribute 'StudyID'")

    monkeypatch.setattr(tasks, "publish_job", broken)
    job_id = _job(rstore)
    tasks.use_store(rstore)
    try:
        with pytest.raises(AttributeError):
            build_app(rstore.settings).tasks[PUBLISH_TASK].run(job_id)
    finally:
        tasks.use_store(None)
    assert _state_job(rstore, job_id).flags["publish_error"] == "render_failed:AttributeError"


def test_a_publish_interrupted_by_io_is_retried_not_recorded(rstore: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError (a blob on a flaky share) or a pool timeout passes: retried, not a publish_error that
    stops the stalled-publish sweep from handing the job off again."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from msgate.errors import Transient
    from msgate.results import tasks
    from msgate.results.tasks import PUBLISH_TASK
    from msgate.workers.celery_app import build_app

    job_id = _job(rstore)
    for error in (OSError(5, "Input/output error"), PoolTimeout("QueuePool limit reached")):
        def broken(store: Store, jid: str, error: Exception = error) -> str:
            raise error

        monkeypatch.setattr(tasks, "publish_job", broken)
        tasks.use_store(rstore)
        try:
            with pytest.raises(Transient):
                build_app(rstore.settings).tasks[PUBLISH_TASK].run(job_id)
        finally:
            tasks.use_store(None)
        assert "publish_error" not in _state_job(rstore, job_id).flags


def test_sources_without_type2_study_attributes_are_published(rstore: Store) -> None:
    """Anonymisers and routers remove StudyID, StudyTime, the referring physician: highdicom reads them
    from the source, and the publish failed for good after the result was computed."""
    job_id = _job(rstore, with_flair=True, strip=("StudyID", "StudyTime", "ReferringPhysicianName", "PatientSex"))
    store_result(rstore, job_id=job_id, result=model_result((12, 40, 48)))
    assert publish_job(rstore, job_id) == "queued"
    with rstore.db.session() as session:
        rows = session.exec(select(OutboxEntry.blob_id, Blob.kind).join(Blob, col(Blob.id) == col(OutboxEntry.blob_id))
                            .where(OutboxEntry.job_id == job_id)).all()
        sr = dcmread(io.BytesIO(rstore.blobs.read(session, next(b for b, k in rows if k == "out.sr"))))
    assert {k for _, k in rows} >= {"out.sr", "out.seg", "out.oru"}
    assert sr.StudyID == "" and sr.StudyTime == "" and sr.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.1"


def _entries(store: Store, job_id: str, n: int = 2) -> list[str]:
    with store.db.session() as session:
        objects = [outbox.Rendered("out.sr", b"DICM" * 8)] * (n // 2)
        return [e.id for e in outbox.enqueue(store, session, job_id=job_id, objects=objects)]


def _state(store: Store, entry_id: str) -> OutboxEntry:
    with store.db.session() as session:
        entry = session.get(OutboxEntry, entry_id)
        assert entry is not None
        return entry


def _outcomes(store: Store, entry_id: str) -> list[str]:
    with store.db.session() as session:
        return [a.outcome for a in outbox_ops.attempts_of(session, entry_id)]


def test_enqueue_one_entry_per_pacs_and_a_retry_backs_off(rstore: Store) -> None:
    job = _job(rstore)
    ids = _entries(rstore, job)
    assert {_state(rstore, i).destination for i in ids} == {"pacs-a", "pacs-b"}
    claimed = outbox.claim(rstore, POLICY)
    assert {c.id for c in claimed} == set(ids) and all(_state(rstore, i).state == "sending" for i in ids)
    assert outbox.claim(rstore, POLICY) == []  # leased
    before = utcnow()
    assert outbox.record(rstore, claimed[0], outbox.Attempt("retry", "0xA700", "out of resources"), POLICY) == "pending"
    entry = _state(rstore, claimed[0].id)
    assert entry.attempts == 1 and entry.last_error == "out of resources"
    assert before + timedelta(seconds=1.9) <= entry.next_attempt_at <= utcnow() + timedelta(seconds=4)
    with rstore.db.session() as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.kind == "send.attempt")).all()
    assert [(e.subject, e.detail["outcome"], e.detail["peer_status"]) for e in events] == \
        [(f"outbox:{claimed[0].id}", "retry", "0xA700")]


def test_expired_lease_is_reclaimed_and_recorded_as_interrupted(rstore: Store) -> None:
    entry_id = _entries(rstore, _job(rstore))[0]
    outbox.claim(rstore, outbox.Policy(lease=60))
    later = utcnow() + timedelta(seconds=61)
    again = [c for c in outbox.claim(rstore, POLICY, now=later) if c.id == entry_id]
    assert again and _outcomes(rstore, entry_id) == ["interrupted"]
    outbox.record(rstore, again[0], outbox.Attempt("delivered", "0x0000"), POLICY)
    assert _state(rstore, entry_id).state == "delivered"


def test_an_entry_whose_sender_keeps_dying_is_dead_lettered_at_max_age(rstore: Store) -> None:
    """A sender that crashes on one object never records an outcome: each lease expiry is an attempt,
    and past max_age the entry is dead instead of re-leased forever."""
    entry_id = _entries(rstore, _job(rstore))[0]
    start = utcnow()
    outbox.claim(rstore, POLICY, now=start)
    outbox.claim(rstore, POLICY, now=start + timedelta(seconds=61))
    assert _state(rstore, entry_id).attempts == 1
    late = start + timedelta(seconds=POLICY.max_age + 200)
    assert entry_id not in [c.id for c in outbox.claim(rstore, POLICY, now=late)]
    entry = _state(rstore, entry_id)
    assert (entry.state, entry.attempts) == ("dead", 2) and _outcomes(rstore, entry_id) == ["interrupted", "expired"]


def test_an_unexpected_error_mid_batch_retries_the_unanswered_entries(rstore: Store,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug or an odd object raising inside a destination's delivery: entries already answered keep
    their outcome, the one in flight (renewed) and the ones not reached go back to pending with backoff."""
    ids = _entries(rstore, _job(rstore), n=6)
    for_a = sorted(i for i in ids if _state(rstore, i).destination == "pacs-a")

    def boom(store: Store, dest: object, items: list[outbox.Claimed], policy: outbox.Policy) -> None:
        first = outbox.renew(store, items[0], policy)
        assert first is not None
        outbox.record(store, first, outbox.Attempt("delivered", "0x0000"), policy)
        outbox.renew(store, items[1], policy)
        raise KeyError("a bug")

    monkeypatch.setattr(outbox_send, "deliver_dicom", boom)
    outbox.deliver(rstore, [c for c in outbox.claim(rstore, POLICY) if c.id in for_a], POLICY)
    states = sorted((_state(rstore, i).state, _state(rstore, i).attempts) for i in for_a)
    assert states == [("delivered", 1), ("pending", 1), ("pending", 1)]
    pending = [i for i in for_a if _state(rstore, i).state == "pending"]
    assert all(_outcomes(rstore, i) == ["retry"] and _state(rstore, i).last_error.endswith("(KeyError)")
               for i in pending)


def test_a_claim_that_lost_its_lease_neither_sends_nor_records(rstore: Store) -> None:
    """Sender A's lease on an entry still waiting in its batch runs out and sender B takes it: A must
    not send it (renew says no) nor record an outcome over B's claim. A holder's renewal keeps it."""
    first, second = _entries(rstore, _job(rstore))
    start = utcnow()
    a_first, a_second = sorted(outbox.claim(rstore, POLICY, now=start), key=lambda c: c.id != first)
    assert outbox.renew(rstore, a_first, POLICY, now=start + timedelta(seconds=30)) is not None
    b = outbox.claim(rstore, POLICY, now=start + timedelta(seconds=61))  # only the entry A did not renew
    assert [c.id for c in b] == [second]
    assert outbox.renew(rstore, a_second, POLICY) is None
    assert outbox.record(rstore, a_second, outbox.Attempt("retry", "none", "A's late answer"), POLICY) == "sending"
    assert outbox.record(rstore, b[0], outbox.Attempt("delivered", "0x0000"), POLICY) == "delivered"
    assert _outcomes(rstore, second) == ["interrupted", "delivered"]


def test_max_age_and_permanent_failures_dead_letter(rstore: Store) -> None:
    a, b = _entries(rstore, _job(rstore))
    claimed = {c.id: c for c in outbox.claim(rstore, POLICY)}
    late = utcnow() + timedelta(seconds=POLICY.max_age + 1)
    assert outbox.record(rstore, claimed[a], outbox.Attempt("retry", "0xA700", "busy"), POLICY, now=late) == "dead"
    assert _outcomes(rstore, a) == ["expired"]
    assert outbox.record(rstore, claimed[b], outbox.Attempt("dead", "rejected", "AR"), POLICY) == "dead"
    # an operator retry restarts the age window
    assert outbox_ops.requeue(rstore, [a], actor="cli:test") == [a]
    claimed = {c.id: c for c in outbox.claim(rstore, POLICY)}
    assert outbox.record(rstore, claimed[a], outbox.Attempt("retry", "0xA700", "busy"), POLICY) == "pending"
    assert _outcomes(rstore, a) == ["expired", "requeued", "retry"]


def test_study_delivered_only_when_every_entry_is_done(rstore: Store) -> None:
    job = _job(rstore)
    a, b = _entries(rstore, job)
    claimed = {c.id: c for c in outbox.claim(rstore, POLICY)}
    outbox.record(rstore, claimed[a], outbox.Attempt("delivered", "0x0000"), POLICY)
    with rstore.db.session() as session:
        assert session.exec(select(Study)).one().delivered_at is None
    outbox.record(rstore, claimed[b], outbox.Attempt("dead", "0xA900"), POLICY)
    with rstore.db.session() as session:
        assert session.exec(select(Study)).one().delivered_at is None
    assert outbox_ops.drop(rstore, [b], actor="cli:test") == [b]
    with rstore.db.session() as session:
        assert session.exec(select(Study)).one().delivered_at is not None
    assert outbox_ops.drop(rstore, [a], actor="cli:test") == []  # delivered entries stay


def test_cli_list_retry_drop(rstore: Store) -> None:
    a, b = _entries(rstore, _job(rstore))
    claimed = {c.id: c for c in outbox.claim(rstore, POLICY)}
    outbox.record(rstore, claimed[a], outbox.Attempt("dead", "rejected", "MSH-10 X: peer rejected (AR)"), POLICY)
    outbox.record(rstore, claimed[b], outbox.Attempt("retry", "0xA700", "busy"), POLICY)
    runner = CliRunner()
    obj = State(rstore.settings)
    out = runner.invoke(outbox_cmd.app, ["list", "--state", "dead", "--json"], obj=obj)
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [r["id"] for r in rows] == [a]
    assert rows[0]["history"][-1]["peer_status"] == "rejected" and rows[0]["object"] == "sr"
    out = runner.invoke(outbox_cmd.app, ["list"], obj=obj)
    assert out.exit_code == 0 and "dead" in out.output and "pacs-" in out.output
    out = runner.invoke(outbox_cmd.app, ["retry", "--dead", "--json"], obj=obj)
    assert json.loads(out.output)["requeued"] == [a]
    out = runner.invoke(outbox_cmd.app, ["drop", b[:10], "--json"], obj=obj)
    assert json.loads(out.output)["dropped"] == [b]
    assert _state(rstore, a).state == "pending" and _state(rstore, b).state == "dropped"
    with rstore.db.session() as session:
        kinds = [e.kind for e in session.exec(select(AuditEvent).order_by(col(AuditEvent.seq))).all()]
    assert "outbox.retry" in kinds and "outbox.drop" in kinds


def test_drop_skips_an_entry_a_sender_holds_and_its_answer_is_recorded(rstore: Store) -> None:
    """An operator drop while the sender is mid-send used to win: the peer's answer was thrown away, with
    no attempt row and no send.attempt event. In flight (lease running) is skipped; an expired lease
    (the sender stopped) can be dropped."""
    held, stalled = _entries(rstore, _job(rstore))
    claimed = {c.id: c for c in outbox.claim(rstore, outbox.Policy(lease=0.001))}  # leases that run out
    renewed = outbox.renew(rstore, claimed[held], POLICY)  # the sender is sending this one now
    assert renewed is not None
    out = CliRunner().invoke(outbox_cmd.app, ["drop", held, stalled, "--json"], obj=State(rstore.settings))
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"dropped": [stalled], "skipped": [held]}
    assert outbox.record(rstore, renewed, outbox.Attempt("delivered", "0x0000", "stored"), POLICY) == "delivered"
    assert _outcomes(rstore, held) == ["delivered"] and _state(rstore, stalled).state == "dropped"
    with rstore.db.session() as session:
        sends = session.exec(select(AuditEvent).where(AuditEvent.kind == "send.attempt")).all()
        assert [e.subject for e in sends] == [f"outbox:{held}"]
        assert session.exec(select(Study)).one().delivered_at is not None
    text = CliRunner().invoke(outbox_cmd.app, ["drop", held], obj=State(rstore.settings))
    assert "skipped 1 (delivered, dropped or in flight)" in text.output


def _deliver(store: Store, job_id: str, kinds: tuple[str, ...]) -> None:
    """Mark the job's entries of these blob kinds delivered (what the sender does on success)."""
    with store.db.session() as session:
        for entry, kind in session.exec(select(OutboxEntry, Blob.kind).join(Blob, col(Blob.id) == col(OutboxEntry.blob_id))
                                        .where(OutboxEntry.job_id == job_id)).all():
            if kind in kinds:
                entry.state, entry.delivered_at = "delivered", utcnow()
                session.add(entry)


def _one_lesion(shape: tuple[int, int, int]) -> object:
    import dataclasses

    import numpy as np

    res = model_result(shape, version="0.3.2", edss=5.0, qsm=False)
    return dataclasses.replace(res, lesions=res.lesions[:1],
                               lesion_mask=np.where(res.lesion_mask == 1, 1, 0).astype(np.int16))


def test_publish_job_is_idempotent_and_a_successor_is_a_correction(rstore: Store) -> None:
    first = _job(rstore, with_flair=True)
    shape = (12, 40, 48)
    store_result(rstore, job_id=first, result=model_result(shape))
    assert publish_job(rstore, first) == "queued"
    assert publish_job(rstore, first) == "already"
    assert "rendered_at" in _state_job(rstore, first).flags  # the reconciler's stalled-publish sweep skips it
    with rstore.db.session() as session:
        rows = session.exec(select(OutboxEntry, Blob.kind).join(Blob, col(Blob.id) == col(OutboxEntry.blob_id))
                            .where(OutboxEntry.job_id == first)).all()
        old_sr_blob = next(e.blob_id for e, k in rows if k == "out.sr")
        old_sr = dcmread(io.BytesIO(rstore.blobs.read(session, old_sr_blob)))
        session.get(Job, first).state = "superseded"  # type: ignore[union-attr]
    kinds = sorted(k for _, k in rows)
    n_sc = kinds.count("out.sc") // 2
    assert kinds == sorted(["out.seg"] * 2 + ["out.pm"] * 2 + ["out.sc"] * 2 * n_sc + ["out.sr"] * 2 + ["out.oru"])
    assert publish_job(rstore, first) == "already"
    _deliver(rstore, first, ("out.sr", "out.oru"))  # the SR and ORU went out; the images are still pending
    second = _job(rstore, supersedes=first, idem="k2")
    store_result(rstore, job_id=second, result=_one_lesion(shape))  # type: ignore[arg-type]
    assert publish_job(rstore, second) == "queued"
    with rstore.db.session() as session:
        rows = session.exec(select(OutboxEntry.blob_id, Blob.kind).join(Blob, col(Blob.id) == col(OutboxEntry.blob_id))
                            .where(OutboxEntry.job_id == second)).all()
        blobs = {k: rstore.blobs.read(session, b) for b, k in rows}
        attempts = session.exec(select(OutboxAttempt)).all()
        old = session.exec(select(OutboxEntry, Blob.kind).join(Blob, col(Blob.id) == col(OutboxEntry.blob_id))
                           .where(OutboxEntry.job_id == first)).all()
    # the first job's undelivered objects are dropped, not sent after their correction; delivered ones stay
    assert {k: e.state for e, k in old if k in ("out.sr", "out.oru")} == {"out.sr": "delivered", "out.oru": "delivered"}
    dropped = [e for e, k in old if k not in ("out.sr", "out.oru")]
    assert dropped and {e.state for e in dropped} == {"dropped"} and len(attempts) == len(dropped)
    assert {(a.entry_id, a.outcome) for a in attempts} == {(e.id, "superseded") for e in dropped}
    new_sr = dcmread(io.BytesIO(blobs["out.sr"]))
    ref = new_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == old_sr.SOPInstanceUID
    assert new_sr.StudyInstanceUID == old_sr.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.1"
    oru = blobs["out.oru"].decode()
    assert new_sr.SOPInstanceUID in oru
    obx = [line.split("|") for line in oru.split("\r") if line.startswith("OBX")]
    assert all(o[11] == "P" for o in obx if o[11] != "D")
    assert "|Correction: replaces" in oru
    # what the first ORU said and this one does not (lesions 2 and 3, the Rim+ values without QSM) is
    # retracted with status D; lesion 1 stays current
    gone = {(o[3].split("^")[0], o[4]) for o in obx if o[11] == "D"}
    vol, rim = codes.LESION_VOLUME.value, codes.RIM_PROBABILITY.value
    assert {(vol, "2"), (vol, "3"), (rim, "1"), (codes.RIM_COUNT.value, "")} <= gone and (vol, "1") not in gone
    assert all(o[5] == "" and o[2] == "" for o in obx if o[11] == "D")


def test_a_result_whose_send_may_have_arrived_is_corrected(rstore: Store) -> None:
    """The ORU was sent once and its ACK timed out (still pending, one attempt): the EHR may have filed it,
    so the next result is a correction that retracts what it no longer has."""
    first = _job(rstore, with_flair=True)
    shape = (12, 40, 48)
    store_result(rstore, job_id=first, result=model_result(shape))
    assert publish_job(rstore, first) == "queued"
    with rstore.db.session() as session:
        session.get(Job, first).state = "superseded"  # type: ignore[union-attr]
        for entry in session.exec(select(OutboxEntry).where(OutboxEntry.job_id == first, OutboxEntry.kind == "hl7")):
            entry.attempts = 1
            session.add(entry)
    second = _job(rstore, supersedes=first, idem="k2")
    store_result(rstore, job_id=second, result=_one_lesion(shape))  # type: ignore[arg-type]
    assert publish_job(rstore, second) == "queued"
    with rstore.db.session() as session:
        blob = session.exec(select(OutboxEntry.blob_id).where(OutboxEntry.job_id == second,
                                                              OutboxEntry.kind == "hl7")).one()
        oru = rstore.blobs.read(session, blob).decode()
    assert "|Correction: replaces" in oru
    assert any(line.split("|")[11] == "D" for line in oru.split("\r") if line.startswith("OBX"))


def test_a_successor_of_an_undelivered_result_is_not_a_correction(rstore: Store) -> None:
    """Nothing of the first result reached the PACS or the EHR (all still pending, then dropped): the new
    SR names no predecessor the PACS never got, and the ORU does not claim to replace anything."""
    first = _job(rstore, with_flair=True)
    shape = (12, 40, 48)
    store_result(rstore, job_id=first, result=model_result(shape))
    assert publish_job(rstore, first) == "queued"
    with rstore.db.session() as session:
        session.get(Job, first).state = "superseded"  # type: ignore[union-attr]
    second = _job(rstore, supersedes=first, idem="k2")
    store_result(rstore, job_id=second, result=model_result(shape, version="0.3.2", edss=5.0))
    assert publish_job(rstore, second) == "queued"
    with rstore.db.session() as session:
        rows = session.exec(select(OutboxEntry.blob_id, Blob.kind).join(Blob, col(Blob.id) == col(OutboxEntry.blob_id))
                            .where(OutboxEntry.job_id == second)).all()
        blobs = {k: rstore.blobs.read(session, b) for b, k in rows}
        old = session.exec(select(OutboxEntry).where(OutboxEntry.job_id == first)).all()
    assert {e.state for e in old} == {"dropped"}
    assert "PredecessorDocumentsSequence" not in dcmread(io.BytesIO(blobs["out.sr"]))
    oru = blobs["out.oru"].decode()
    assert "Correction" not in oru and not any(line.split("|")[11] == "D" for line in oru.split("\r")
                                                  if line.startswith("OBX"))


def test_superseded_job_is_not_published(rstore: Store) -> None:
    job = _job(rstore)
    with rstore.db.session() as session:
        session.get(Job, job).state = "superseded"  # type: ignore[union-attr]
    assert publish_job(rstore, job) == "skipped:superseded"


def test_a_correction_is_recognised_at_an_hl7_only_site(tmp_path: Path) -> None:
    """No PACS configured, so no SR was queued for the first result: the second used to go out as a plain
    result, without saying it replaces the first (whose ORU the EHR got)."""
    settings = make_settings(tmp_path / "home", "sqlite", hl7_out={"port": 2599})
    store = open_store(settings)
    try:
        first = _job(store, with_flair=True)
        store_result(store, job_id=first, result=model_result((12, 40, 48)))
        assert publish_job(store, first) == "queued"
        with store.db.session() as session:
            session.get(Job, first).state = "superseded"  # type: ignore[union-attr]
        _deliver(store, first, ("out.oru",))
        second = _job(store, supersedes=first, idem="k2")
        store_result(store, job_id=second, result=model_result((12, 40, 48), version="0.3.2", edss=5.0))
        assert publish_job(store, second) == "queued"
        with store.db.session() as session:
            entries = session.exec(select(OutboxEntry).order_by(col(OutboxEntry.created_at))).all()
            assert [(e.job_id, e.kind, e.state) for e in entries] == [(first, "hl7", "delivered"),
                                                                     (second, "hl7", "pending")]
            oru = store.blobs.read(session, entries[1].blob_id).decode()
        assert "|Correction: replaces" in oru
    finally:
        store.close()


def test_publish_renders_on_the_frames_the_worker_recorded(rstore: Store) -> None:
    """The worker assembled the FLAIR from one Enhanced MR instance (its flags name the instance and the
    frame of each slice): the SEG references that instance frame by frame, not the study's other FLAIR."""
    import highdicom as hd
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    from msgate.results.seg import frame_map
    from msgate.storage.models import Instance
    from msgate.workers import volume

    study_uid = "1.2.826.0.1.3680043.8.498.7"
    slices = flair_series(n=12, rows=40, cols=48, seed=8, study_uid=study_uid)
    mf = LegacyConvertedEnhancedMRImage(legacy_datasets=slices, series_instance_uid=hd.UID(), series_number=9,
                                        sop_instance_uid=hd.UID(), instance_number=1)
    for ds in [mf, *flair_series(n=12, rows=40, cols=48, seed=9, study_uid=study_uid)]:
        rstore.ingest.store_instance(source=encode(ds))
    stored = dcmread(io.BytesIO(encode(mf)))
    frames = volume.assemble([stored], "FLAIR").frames
    with rstore.db.session() as session:
        instance = session.exec(select(Instance).where(Instance.sop_class_uid == str(mf.SOPClassUID))).one()
        study_id = instance.study_id
        for series in session.exec(select(Series)).all():
            series.role = "FLAIR"
            session.add(series)
        job = Job(study_id=study_id, idem_key="mf", state="done",
                  flags={"flair_instances": [instance.id] * 12, "flair_frames": list(frames)})
        session.add(job)
        session.flush()
        job_id = job.id
    store_result(rstore, job_id=job_id, result=model_result((12, 40, 48)))
    assert publish_job(rstore, job_id) == "queued"
    with rstore.db.session() as session:
        blob_id = session.exec(select(OutboxEntry.blob_id).join(Blob, col(Blob.id) == col(OutboxEntry.blob_id))
                               .where(OutboxEntry.job_id == job_id, Blob.kind == "out.seg")).first()
        seg = dcmread(io.BytesIO(rstore.blobs.read(session, blob_id)))
    refs = {(uid, number) for _, uid, number in frame_map(seg)}
    assert refs and {uid for uid, _ in refs} == {str(mf.SOPInstanceUID)}
    assert all(number is not None and 1 <= number <= 12 for _, number in refs)


def test_a_job_superseded_while_it_renders_queues_nothing(rstore: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A successor created while the old job rendered: the old job's stale objects were queued after the
    successor's (the state was checked only before rendering)."""
    from msgate.results import publish
    from msgate.workers import jobs as jobs_mod

    first = _job(rstore, with_flair=True)
    store_result(rstore, job_id=first, result=model_result((12, 40, 48)))
    real_render = publish.render

    def render_then_superseded(*args: object, **kwargs: object) -> object:
        out = real_render(*args, **kwargs)  # type: ignore[arg-type]
        with rstore.db.session() as session:
            study_id = session.get(Job, first).study_id  # type: ignore[union-attr]
        assert jobs_mod.create(rstore.db, study_id=study_id, idem_key="successor", model_version="m", flags={})
        return out

    monkeypatch.setattr(publish, "render", render_then_superseded)
    assert publish_job(rstore, first) == "skipped:superseded"
    with rstore.db.session() as session:
        assert session.exec(select(OutboxEntry).where(OutboxEntry.job_id == first)).first() is None


def test_a_correction_names_the_last_sr_that_was_not_dropped(rstore: Store) -> None:
    """A -> B -> C: B's objects were dropped (superseded before delivery), so the PACS never had B's SR;
    C's SR must name A's as its predecessor, not B's."""
    shape = (12, 40, 48)
    a = _job(rstore, with_flair=True)
    store_result(rstore, job_id=a, result=model_result(shape))
    assert publish_job(rstore, a) == "queued"
    b = _job(rstore, supersedes=a, idem="kb")
    store_result(rstore, job_id=b, result=model_result(shape, edss=4.0))
    assert publish_job(rstore, b) == "queued"
    with rstore.db.session() as session:
        for entry in session.exec(select(OutboxEntry)).all():
            entry.state = "delivered" if entry.job_id == a else "dropped"
            session.add(entry)

        def sr_uid(job_id: str) -> str:
            blob = session.exec(select(OutboxEntry.blob_id).join(Blob, col(Blob.id) == col(OutboxEntry.blob_id))
                                .where(OutboxEntry.job_id == job_id, Blob.kind == "out.sr")).first()
            return str(dcmread(io.BytesIO(rstore.blobs.read(session, blob))).SOPInstanceUID)

        a_sr = sr_uid(a)
    c = _job(rstore, supersedes=b, idem="kc")
    store_result(rstore, job_id=c, result=model_result(shape, edss=5.0))
    assert publish_job(rstore, c) == "queued"
    with rstore.db.session() as session:
        blob = session.exec(select(OutboxEntry.blob_id).join(Blob, col(Blob.id) == col(OutboxEntry.blob_id))
                            .where(OutboxEntry.job_id == c, Blob.kind == "out.sr")).first()
        new_sr = dcmread(io.BytesIO(rstore.blobs.read(session, blob)))
    ref = new_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == a_sr


def test_the_oru_names_the_order_of_this_patient_not_anothers_with_the_same_accession(rstore: Store) -> None:
    """Two patients' orders share an accession (a counter restart, another facility): the ORU carries the
    order the worker linked the job to, never the newest order with that accession."""
    import time

    from msgate.storage.models import Order, Patient
    from msgate.workers import ehr

    job_id = _job(rstore, with_flair=True)  # images: accession ACC-R-1
    c = rstore.cipher
    with rstore.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        study = session.get(Study, job.study_id)
        assert study is not None
        mine, other = Patient(), Patient()
        session.add_all([mine, other])
        session.flush()
        study.patient_id = mine.id
        session.add(study)

        def order(patient: Patient, number: str) -> Order:
            return Order(patient_id=patient.id, accession_index=study.accession_index,
                         placer_enc=c.encrypt(f"PL-{number}", column="order.placer"),
                         filler_enc=c.encrypt(f"FI-{number}", column="order.filler"))

        session.add(order(mine, "MINE"))
        session.flush()
        time.sleep(0.01)
        session.add(order(other, "OTHER"))  # newer, another patient
        session.flush()
        job.flags = {**job.flags, "order_id": ehr.link(session, study, c).order_id}
        session.add(job)
    store_result(rstore, job_id=job_id, result=model_result((12, 40, 48)))
    assert publish_job(rstore, job_id) == "queued"
    with rstore.db.session() as session:
        blob = session.exec(select(OutboxEntry.blob_id).where(OutboxEntry.kind == "hl7")).one()
        oru = rstore.blobs.read(session, blob).decode()
    segments = {line[:3]: line.split("|") for line in oru.split("\r") if line}
    assert (segments["ORC"][2], segments["ORC"][3], segments["OBR"][2]) == ("PL-MINE", "FI-MINE", "PL-MINE")
    assert "OTHER" not in oru


def test_an_oru_that_cannot_be_built_does_not_hold_back_the_sr(rstore: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ORU is refused (strict validation): the SR and the images still go to the PACS, and the job
    and the audit chain say why there is no ORU."""
    from msgate.errors import Rejected
    from msgate.results import hl7_out

    def refuse(*args: object, **kwargs: object) -> str:
        raise Rejected("ORU failed strict validation (MaxLengthReached)", code="oru_invalid")

    monkeypatch.setattr(hl7_out, "render_oru", refuse)
    job_id = _job(rstore, with_flair=True)
    store_result(rstore, job_id=job_id, result=model_result((12, 40, 48)))
    assert publish_job(rstore, job_id) == "queued"
    with rstore.db.session() as session:
        kinds = set(session.exec(select(Blob.kind).join(OutboxEntry, col(OutboxEntry.blob_id) == col(Blob.id))
                                 .where(OutboxEntry.job_id == job_id)).all())
        events = session.exec(select(AuditEvent).where(AuditEvent.kind == "results.oru_refused")).all()
    assert "out.sr" in kinds and "out.oru" not in kinds
    assert _state_job(rstore, job_id).flags["oru_error"] == "oru_invalid"
    assert [e.subject for e in events] == [f"job:{job_id}"]


def test_a_result_re_run_for_another_patient_withdraws_the_first_one(rstore: Store) -> None:
    """The PACS corrected the study's patient after its result had gone out, and sent it again: the new
    result went out as a "correction" under the new patient, retracting values never sent to them, and the
    first patient's chart kept a result computed from someone else's images. Now the first ORU is sent
    again withdrawn (OBX-11 W) to the patient and order it named, and the new one is a first result."""
    from msgate.storage.models import Instance

    first = _job(rstore, with_flair=True)
    shape = (12, 40, 48)
    store_result(rstore, job_id=first, result=model_result(shape))
    assert publish_job(rstore, first) == "queued"
    _deliver(rstore, first, ("out.sr", "out.oru"))
    with rstore.db.session() as session:
        session.get(Job, first).state = "superseded"  # type: ignore[union-attr]
        bodies = [rstore.blobs.read(session, row.blob_id) for row in session.exec(
            select(Instance).where(col(Instance.current).is_(True))).all()]
        old_oru = next(rstore.blobs.read(session, e.blob_id) for e in session.exec(
            select(OutboxEntry).where(OutboxEntry.job_id == first, OutboxEntry.kind == "hl7")).all()).decode()
    for body in bodies:  # the corrected study, re-sent under another MRN
        ds = dcmread(io.BytesIO(body))
        ds.PatientID = "CORRECTED9"
        assert not rstore.ingest.store_instance(source=encode(ds)).duplicate
    second = _job(rstore, supersedes=first, idem="k2")
    store_result(rstore, job_id=second, result=model_result(shape))
    assert publish_job(rstore, second) == "queued"
    with rstore.db.session() as session:
        orus = [rstore.blobs.read(session, e.blob_id).decode() for e in session.exec(
            select(OutboxEntry).where(OutboxEntry.job_id == second, OutboxEntry.kind == "hl7")).all()]
        assert session.exec(select(AuditEvent).where(AuditEvent.kind == "results.withdrawn")).first() is not None
    withdrawn = next(m for m in orus if "Withdrawn" in m)
    new = next(m for m in orus if "Withdrawn" not in m)

    def pid(message: str) -> str:
        return next(line for line in message.split("\r") if line.startswith("PID")).split("|")[3]

    assert pid(withdrawn) == pid(old_oru) != pid(new) and "CORRECTED9" in pid(new)
    assert {line.split("|")[11] for line in withdrawn.split("\r") if line.startswith("OBX")} == {"W"}
    assert "Correction: replaces" not in new
    assert not any(line.split("|")[11] == "D" for line in new.split("\r") if line.startswith("OBX"))
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    parse_message(withdrawn, validation_level=VALIDATION_LEVEL.STRICT,
                  find_groups=True).validate()  # as valid as the message it withdraws


def _publish_and_deliver(store: Store, job_id: str, shape: tuple[int, int, int] = (12, 40, 48)) -> str:
    """Publish the job, mark its SR and ORU delivered, supersede it; its ORU."""
    store_result(store, job_id=job_id, result=model_result(shape))
    assert publish_job(store, job_id) == "queued"
    _deliver(store, job_id, ("out.sr", "out.oru"))
    with store.db.session() as session:
        session.get(Job, job_id).state = "superseded"  # type: ignore[union-attr]
    [oru] = _orus(store, job_id)
    return oru


def _orus(store: Store, job_id: str) -> list[str]:
    with store.db.session() as session:
        return [store.blobs.read(session, e.blob_id).decode() for e in session.exec(
            select(OutboxEntry).where(OutboxEntry.job_id == job_id, OutboxEntry.kind == "hl7")).all()]


def _pid3(message: str) -> str:
    return next(line for line in message.split("\r") if line.startswith("PID")).split("|")[3]


def _planned(store: Store, job_id: str) -> None:
    """The flags the scheduler plans a job with (``workers.scheduler.plan``): the EHR link as it is now."""
    from msgate.workers import ehr

    with store.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        study = session.get(Study, job.study_id)
        assert study is not None
        link = ehr.link(session, study, store.cipher)
        job.flags = {**job.flags, "patient_id": link.patient_id, "order_id": link.order_id}
        session.add(job)


def _withdrawals(store: Store) -> int:
    with store.db.session() as session:
        return len(session.exec(select(AuditEvent).where(AuditEvent.kind == "results.withdrawn")).all())


@pytest.mark.parametrize("planned", [True, False], ids=["planned-flags", "no-flags"])
def test_a_result_sent_before_the_adt_with_the_images_qualifiers_is_corrected_not_withdrawn(
        rstore: Store, planned: bool) -> None:
    """Review 2026-12-11: the first ORU went out before the ADT, PID-3 from the images with
    IssuerOfPatientID and its qualifiers (``HOSP&1.2.3.4&ISO``); after the ADT linked the study, the
    correction named the EHR identifier as stored (``HOSP``). The whole CX.4 texts differed, so the patient's
    own result was withdrawn from their chart as "sent for the wrong patient"."""
    from pydicom.dataset import Dataset

    from msgate.hl7.mapping import map_messages
    from msgate.hl7.msh import read_msh
    from msgate.results import hl7_out

    qualifier = Dataset()
    qualifier.UniversalEntityID, qualifier.UniversalEntityIDType = "1.2.3.4", "ISO"
    for ds in flair_series(n=12, rows=40, cols=48, seed=5, study_uid="1.2.826.0.1.3680043.8.498.1"):
        ds.IssuerOfPatientIDQualifiersSequence = [qualifier]
        rstore.ingest.store_instance(source=encode(ds))
    first = _job(rstore)
    if planned:
        _planned(rstore, first)
    old = _publish_and_deliver(rstore, first)
    assert _pid3(old) == "MRN-R-1^^^HOSP&1.2.3.4&ISO^MR"
    adt = ("MSH|^~\\&|ADT|HOSP|||20261120||ADT^A04|A1|P|2.5.1\r"
           "PID|1||MRN-R-1^^^HOSP&1.2.3.4&ISO^MR||RESULTS^TEST||19800202|F\r").encode()
    stored = rstore.ingest.store_hl7(raw=adt, header=read_msh(adt).header())
    assert map_messages(rstore, [stored.message_id])[stored.message_id].state == "mapped"
    second = _job(rstore, supersedes=first, idem="k2")
    if planned:
        _planned(rstore, second)
        assert _state_job(rstore, second).flags["patient_id"] is not None  # linked now
    store_result(rstore, job_id=second, result=model_result((12, 40, 48)))
    assert publish_job(rstore, second) == "queued"
    [new] = _orus(rstore, second)
    assert _pid3(new) == "MRN-R-1^^^HOSP^MR"
    assert "Withdrawn" not in new and hl7_out.CORRECTION in new
    assert _withdrawals(rstore) == 0


@pytest.mark.parametrize("case", ["another", "merged"])
def test_the_ehr_patient_the_earlier_oru_named_decides_a_move(rstore: Store, case: str) -> None:
    """The images name nobody the EHR knows by identifier, so both ORUs carry the images' PID-3; the
    study was linked to patient A when the first result went out. Linked now to another patient B, the
    first result is withdrawn (by text, a correction of A's result went to B); A merged into B is the
    same patient (a correction)."""
    from msgate.results import hl7_out
    from msgate.storage.models import Patient

    first = _job(rstore, with_flair=True)
    with rstore.db.session() as session:
        a, b = Patient(), Patient()
        session.add_all([a, b])
        session.flush()
        a_id, b_id = a.id, b.id
        job = session.get(Job, first)
        assert job is not None
        study = session.get(Study, job.study_id)
        assert study is not None
        study.patient_id = a_id
        session.add(study)
    _planned(rstore, first)
    old = _publish_and_deliver(rstore, first)
    with rstore.db.session() as session:
        job = session.get(Job, first)
        assert job is not None
        study = session.get(Study, job.study_id)
        assert study is not None
        study.patient_id = b_id
        session.add(study)
        if case == "merged":
            retired = session.get(Patient, a_id)
            assert retired is not None
            retired.merged_into_id = b_id
            session.add(retired)
    second = _job(rstore, supersedes=first, idem="k2")
    _planned(rstore, second)
    store_result(rstore, job_id=second, result=model_result((12, 40, 48)))
    assert publish_job(rstore, second) == "queued"
    orus = _orus(rstore, second)
    assert all(_pid3(m) == _pid3(old) for m in orus)  # the text alone says: the same patient
    if case == "another":
        assert len(orus) == 2 and _withdrawals(rstore) == 1
        [new] = [m for m in orus if "Withdrawn" not in m]
        assert hl7_out.CORRECTION not in new
    else:
        assert len(orus) == 1 and _withdrawals(rstore) == 0 and hl7_out.CORRECTION in orus[0]
