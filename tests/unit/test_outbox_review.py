"""Outbox review findings on the real store (SQLite, and PostgreSQL when marked), no peers: a result
superseded while in flight, the delivery metric, the MSH-10 of a resend, and the client's reconnect."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import col, select, update
from typer.testing import CliRunner

from msgate import metrics
from msgate.cli import outbox_cmd
from msgate.cli.common import State
from msgate.hl7 import mllp
from msgate.hl7.client import MllpClient
from msgate.results import control_ids, outbox, outbox_ops
from msgate.results.publish import publish_job
from msgate.storage.models import AuditEvent, Job, OutboxEntry, Series, Study, utcnow
from msgate.storage.store import Store, open_store
from msgate.workers.results_io import store_result
from tests.conftest import make_settings
from tests.integration.pacs_peers import encode, flair_series, model_result

POLICY = outbox.Policy(base_delay=4, max_delay=3600, max_age=3600, lease=60)
SHAPE = (12, 40, 48)


@pytest.fixture
def rstore(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Iterator[Store]:
    pg = request.getfixturevalue("pg_url") if backend == "postgres" else None
    home = tmp_path / "home"
    if backend == "postgres":
        from msgate.storage import keyring

        keyring.init(home / "keys" / "keyring.json")
    st = open_store(make_settings(home, backend, pg, hl7_out={"port": 2599}, pacs=[{"name": "pacs-a", "port": 11999}]))
    yield st
    st.close()


def _job(store: Store, *, supersedes: str | None = None, idem: str = "k1", flair: bool = False) -> str:
    if flair:
        for ds in flair_series(n=12, rows=40, cols=48, seed=5, study_uid="1.2.826.0.1.3680043.8.498.1"):
            store.ingest.store_instance(source=encode(ds))
    with store.db.session() as session:
        series = session.exec(select(Series)).first()
        if series is not None:
            series.role = "FLAIR"
            session.add(series)
            study_id = series.study_id
        else:
            study = session.exec(select(Study)).first() or Study(study_uid_index="idx-review")
            session.add(study)
            session.flush()
            assert study.id is not None
            study_id = study.id
        job = Job(study_id=study_id, idem_key=idem, state="done", supersedes_id=supersedes)
        session.add(job)
        session.flush()
        return job.id


def _queue(store: Store, job_id: str, kinds: tuple[str, ...] = ("out.sr", "out.oru")) -> list[str]:
    """One entry per kind (one PACS, the HL7 destination), without rendering."""
    with store.db.session() as session:
        objects = [outbox.Rendered(k, b"MSH|^~\\&|A|B\r" if k == "out.oru" else b"DICM" * 8) for k in kinds]
        return [e.id for e in outbox.enqueue(store, session, job_id=job_id, objects=objects)]


def _supersede(store: Store, first: str) -> str:
    """The study is read again: a new job supersedes ``first`` and queues its own results."""
    with store.db.session() as session:
        session.get(Job, first).state = "superseded"  # type: ignore[union-attr]
    second = _job(store, supersedes=first, idem="k2")
    _queue(store, second)
    return second


def _entry(store: Store, entry_id: str) -> OutboxEntry:
    with store.db.session() as session:
        entry = session.get(OutboxEntry, entry_id)
        assert entry is not None
        return entry


def _outcomes(store: Store, entry_id: str) -> list[str]:
    with store.db.session() as session:
        return [a.outcome for a in outbox_ops.attempts_of(session, entry_id)]


def _drops(store: Store) -> list[tuple[str, str, str]]:
    with store.db.session() as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.kind == "outbox.drop")
                              .order_by(col(AuditEvent.seq))).all()
        return [(e.subject, e.actor, e.detail["reason"]) for e in events]


# --- 1. a result superseded while in flight ---------------------------------------------------------


def test_a_result_superseded_while_its_answer_is_awaited_is_dropped_not_resent(rstore: Store) -> None:
    """The ORU was on its way (``sending``, ACK awaited) when the correction was published: publish left
    it alone, its ACK timeout put it back to pending and it was resent AFTER the correction, so the EHR
    ended on the out-of-date values. Now the answer is recorded and the entry dropped as superseded."""
    first = _job(rstore, flair=True)
    store_result(rstore, job_id=first, result=model_result(SHAPE))
    assert publish_job(rstore, first) == "queued"
    claimed = {c.id: c for c in outbox.claim(rstore, POLICY)}  # everything in flight
    with rstore.db.session() as session:
        session.get(Job, first).state = "superseded"  # type: ignore[union-attr]
    second = _job(rstore, supersedes=first, idem="k2")
    store_result(rstore, job_id=second, result=model_result(SHAPE, version="0.3.2", edss=5.0, qsm=False))
    assert publish_job(rstore, second) == "queued"
    assert {_entry(rstore, i).state for i in claimed} == {"sending"}  # in flight: the answer is still recorded
    oru = next(c for c in claimed.values() if c.kind == "hl7")
    sr = next(c for c in claimed.values() if c.blob_kind == "out.sr")
    seg = next(c for c in claimed.values() if c.blob_kind == "out.seg")
    assert outbox.record(rstore, oru, outbox.Attempt("retry", "io", "MSH-10 X: timed out"), POLICY) == "dropped"
    assert outbox.record(rstore, seg, outbox.Attempt("dead", "0xA900", "refused"), POLICY) == "dropped"
    assert outbox.record(rstore, sr, outbox.Attempt("delivered", "0x0000"), POLICY) == "delivered"
    assert _outcomes(rstore, oru.id) == ["retry", "superseded"]  # the peer's answer, then why it stops
    assert _outcomes(rstore, seg.id) == ["dead", "superseded"]
    assert (f"outbox:{oru.id}", "outbox", "superseded") in _drops(rstore)
    assert outbox_ops.requeue(rstore, [oru.id, seg.id], actor="cli:test") == []
    later = utcnow() + timedelta(hours=2)  # past any backoff: only the correction's objects are due
    due = outbox.claim(rstore, POLICY, now=later)
    assert due and {c.job_id for c in due} == {second}


def test_a_superseded_entry_whose_lease_ran_out_or_not_yet_sent_is_not_sent(rstore: Store) -> None:
    """Claimed before the correction was queued: the sender that stopped mid-send left its lease to run
    out (the next claim used to resend it), and an entry still waiting in the batch used to be sent."""
    first = _job(rstore)
    stalled, waiting = _queue(rstore, first)
    start = utcnow()
    claimed = {c.id: c for c in outbox.claim(rstore, POLICY, now=start)}
    second = _supersede(rstore, first)
    assert outbox.renew(rstore, claimed[waiting], POLICY) is None  # not sent
    assert _entry(rstore, waiting).state == "dropped" and _outcomes(rstore, waiting) == ["superseded"]
    again = outbox.claim(rstore, POLICY, now=start + timedelta(seconds=POLICY.lease + 1))
    assert {c.job_id for c in again} == {second}
    assert _entry(rstore, stalled).state == "dropped"
    assert _outcomes(rstore, stalled) == ["interrupted", "superseded"]
    assert sorted(s for s, _, _ in _drops(rstore)) == sorted([f"outbox:{stalled}", f"outbox:{waiting}"])


def test_retry_refuses_an_entry_of_a_superseded_result(rstore: Store) -> None:
    """A dead-lettered (or pending) entry of a result that a correction replaced: ``outbox retry --dead``
    used to send it again, after the correction."""
    first = _job(rstore)
    dead, pending = _queue(rstore, first)
    _supersede(rstore, first)
    with rstore.db.session() as session:  # as a sender before this fix left them, or a race with publish
        session.exec(update(OutboxEntry).where(col(OutboxEntry.id) == dead).values(state="dead"))
        session.exec(update(OutboxEntry).where(col(OutboxEntry.id) == pending).values(state="pending"))
    assert outbox_ops.requeue(rstore, [dead, pending], actor="cli:test") == []
    out = CliRunner().invoke(outbox_cmd.app, ["retry", "--dead", "--json"], obj=State(rstore.settings))
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"requeued": [], "skipped": [dead]}
    assert _entry(rstore, dead).state == "dead" and "requeued" not in _outcomes(rstore, dead)


def test_an_entry_of_a_job_superseded_without_results_is_still_sent(rstore: Store) -> None:
    """Only a successor that queued results of its own retires the earlier ones (a successor that failed
    or was cancelled leaves the earlier result as the current one)."""
    first = _job(rstore)
    entry = _queue(rstore, first)[0]
    _job(rstore, supersedes=first, idem="k2")  # queued nothing
    claimed = {c.id: c for c in outbox.claim(rstore, POLICY)}
    assert entry in claimed
    assert outbox.record(rstore, claimed[entry], outbox.Attempt("retry", "none", "no answer"), POLICY) == "pending"
    assert outbox_ops.requeue(rstore, [entry], actor="cli:test") == [entry]


# --- 3. the delivery metric -----------------------------------------------------------------------


def _count(kind: str, outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value("msgate_outbox_deliveries_total", {"kind": kind, "outcome": outcome})
    return value or 0.0


def test_every_recorded_attempt_is_counted_by_kind_and_outcome(rstore: Store) -> None:
    """docs/operations.md documents msgate_outbox_deliveries_total{kind,outcome}; nothing incremented it."""
    names = [("dicom", o) for o in ("delivered", "retry", "interrupted")] + [("hl7", "dead")]
    before = {n: _count(*n) for n in names}
    sr, oru = _queue(rstore, _job(rstore))
    start = utcnow()
    claimed = {c.id: c for c in outbox.claim(rstore, POLICY, now=start)}
    outbox.record(rstore, claimed[oru], outbox.Attempt("dead", "rejected", "AR"), POLICY)
    again = outbox.claim(rstore, POLICY, now=start + timedelta(seconds=POLICY.lease + 1))  # sr: interrupted
    assert [c.id for c in again] == [sr]
    assert outbox.record(rstore, claimed[sr], outbox.Attempt("retry", "none", "late"), POLICY) == "sending"  # lost
    outbox.record(rstore, again[0], outbox.Attempt("retry", "0xA700", "busy"), POLICY)
    retried = outbox.claim(rstore, POLICY, now=utcnow() + timedelta(hours=2))
    outbox.record(rstore, retried[0], outbox.Attempt("delivered", "0x0000"), POLICY)
    assert {n: _count(*n) - before[n] for n in names} == {("dicom", "delivered"): 1, ("dicom", "retry"): 1,
                                                          ("dicom", "interrupted"): 1, ("hl7", "dead"): 1}


# --- 4. the MSH-10 of a resend --------------------------------------------------------------------


def test_a_resend_after_no_answer_keeps_its_msh10_and_a_negative_answer_moves_it(rstore: Store) -> None:
    """Each attempt used to get a new MSH-10, so an engine that filed a copy whose ACK was lost could not
    tell the resend was a duplicate (HL7 v2.5.1 2.10.3: resend with the same control id)."""
    oru = _queue(rstore, _job(rstore), ("out.oru",))[0]
    seen = []
    steps = [("retry", "io"), ("retry", "closed"), ("retry", "nak"), ("retry", "bad_ack"), ("dead", "rejected")]
    for outcome, status in steps:
        seen.append(control_ids.control_id(oru, control_ids.message_copy(rstore, oru)))
        claimed = outbox.claim(rstore, POLICY, now=utcnow() + timedelta(days=1))
        outbox.record(rstore, claimed[0], outbox.Attempt(outcome, status, f"MSH-10 {seen[-1]}"), POLICY)
    outbox_ops.requeue(rstore, [oru], actor="cli:test")  # the operator fixed the engine's routing
    seen.append(control_ids.control_id(oru, control_ids.message_copy(rstore, oru)))
    assert seen[0] == seen[1] == seen[2] != seen[3] == seen[4] != seen[5]
    assert len(set(seen)) == 3 and all(len(i) <= 20 for i in seen)
    assert seen[0] != control_ids.control_id(_queue(rstore, _job(rstore, idem="k2"), ("out.oru",))[0], 1)


# --- 2. the client and a peer that closes after each ACK ------------------------------------------


def _closing_peer(n: int) -> tuple[int, threading.Thread, list[threading.Event]]:
    """Answers one message per connection with AA, then closes it (Mirth, keep-connection-open off)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(n)
    closed = [threading.Event() for _ in range(n)]

    def serve() -> None:
        for done in closed:
            conn, _ = srv.accept()
            d = mllp.Deframer(1 << 20)
            frames: list[bytes] = []
            while not frames:
                frames = [e.payload for e in d.feed(conn.recv(65536)) if e.kind == "frame"]
            cid = frames[0].split(b"\r")[0].split(b"|")[9].decode()
            conn.sendall(mllp.frame(f"MSH|^~\\&|EHR|H|||2025||ACK|A{cid}|P|2.5.1\rMSA|AA|{cid}\r".encode()))
            conn.close()
            done.set()
        srv.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return srv.getsockname()[1], thread, closed


def test_the_client_reconnects_when_the_peer_closed_after_its_ack() -> None:
    port, thread, closed = _closing_peer(3)
    with MllpClient("127.0.0.1", port, timeout=5) as client:
        for n, done in enumerate(closed):
            message = f"MSH|^~\\&|MSGATE|H|EHR|H|2025||ORU^R01|C{n}|P|2.5.1\rPID|1\r".encode()
            assert client.send(message).control_id == f"C{n}"
            assert done.wait(5)  # the peer has closed this connection before the next send
    thread.join(5)
    assert not thread.is_alive()
