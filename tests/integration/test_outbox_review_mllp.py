"""Outbox review findings over real MLLP sockets: an engine that closes after each ACK, a lost ACK and
the MSH-10 of the resend, and an ORU superseded while its ACK is awaited."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlmodel import select, update

from msgate.results import outbox, outbox_ops
from msgate.results.hl7_out import OrderNumbers, render_oru
from msgate.storage.models import Job, OutboxEntry, Study, utcnow
from msgate.storage.store import Store, open_store
from tests.conftest import make_settings
from tests.integration.mllp_peer import MllpPeer, control_id
from tests.integration.pacs_peers import flair_series, model_result, wait_until

pytestmark = [pytest.mark.integration]
FAST = outbox.Policy(base_delay=0.2, max_delay=1.0, lease=3.0, poll=0.1, hl7_timeout=1.0)


@dataclass
class Engine(MllpPeer):
    """An interface engine: answers each message with the next action of ``script`` (then ``AA``):
    an MSA-1 code, a whole ACK template (``{cid}`` is the message's MSH-10), or ``silent`` (files it,
    never answers)."""

    script: list[str]

    def answer(self, message: bytes) -> bytes | None:
        action = self.script.pop(0) if self.script else "AA"
        if action == "silent":
            return None
        cid = control_id(message)
        if "{cid}" in action:
            return action.format(cid=cid.decode()).encode()
        return (b"MSH|^~\\&|ENGINE|H|MSGATE|H|2025||ACK^R01|A" + cid + b"|P|2.5.1\r"
                + b"MSA|" + action.encode() + b"|" + cid + b"\r")


@pytest.fixture
def engine() -> Iterator[Engine]:
    peer = Engine([]).start()
    yield peer
    peer.stop()


@pytest.fixture
def store(tmp_path: Path, engine: Engine) -> Iterator[Store]:
    st = open_store(make_settings(tmp_path / "home", "sqlite", hl7_out={"host": "127.0.0.1", "port": engine.port}))
    yield st
    st.close()


def _oru(note: str = "") -> outbox.Rendered:
    src = flair_series(n=1, rows=8, cols=8)[0]
    settings = make_settings(Path("/nonexistent"), "sqlite", hl7_out={"port": 1})
    er7 = render_oru(model_result((12, 40, 48)), source=src, numbers=OrderNumbers("P1", "F1", "A1"), sr_uid="1.2.3",
                     correction=bool(note), settings=settings)
    return outbox.Rendered("out.oru", er7.encode())


def _queue(store: Store, *, correction: bool = False, supersedes: str | None = None) -> tuple[str, str]:
    with store.db.session() as session:
        study = session.exec(select(Study)).first() or Study(study_uid_index="s-review")
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, idem_key=f"j-{time.monotonic_ns()}", state="done",  # type: ignore[arg-type]
                  supersedes_id=supersedes)
        session.add(job)
        session.flush()
        entry = outbox.enqueue(store, session, job_id=job.id, objects=[_oru("c" if correction else "")])[0]
        return job.id, entry.id


def _make_due(store: Store) -> None:
    with store.db.session() as session:
        session.exec(update(OutboxEntry).where(OutboxEntry.state == "pending")  # type: ignore[call-overload]
                     .values(next_attempt_at=utcnow()))


def _entry(store: Store, entry_id: str) -> OutboxEntry:
    with store.db.session() as session:
        entry = session.get(OutboxEntry, entry_id)
        assert entry is not None
        return entry


def _history(store: Store, entry_id: str) -> list[tuple[str, str, str]]:
    with store.db.session() as session:
        return [(a.outcome, a.peer_status, a.detail) for a in outbox_ops.attempts_of(session, entry_id)]


def test_an_engine_that_closes_after_each_ack_gets_every_oru_at_once(store: Store, engine: Engine) -> None:
    """Every other ORU used to fail with 'peer closed the connection before acknowledging': the client sent
    it on the connection the engine had closed after the previous ACK."""
    engine.close_after_ack = True
    ids = [_queue(store)[1] for _ in range(4)]
    assert outbox.run_once(store, FAST) == 4
    assert [(_entry(store, i).state, _entry(store, i).attempts) for i in ids] == [("delivered", 1)] * 4
    assert (len(engine.received), engine.connections) == (4, 4)


def test_a_lost_ack_is_resent_with_the_same_msh10(store: Store, engine: Engine) -> None:
    """The engine filed the ORU but its ACK never came: the resend carried a new MSH-10, so the engine's
    duplicate check could not recognise it (HL7 v2.5.1 2.10.3: resend with the same control id)."""
    engine.script[:] = ["silent", "AA"]
    entry = _queue(store)[1]
    outbox.run_once(store, FAST)
    assert _entry(store, entry).state == "pending"
    _make_due(store)
    outbox.run_once(store, FAST)
    assert (_entry(store, entry).state, _entry(store, entry).attempts) == ("delivered", 2)
    first, second = engine.control_ids()
    assert first == second and len(first) <= 20
    assert len({m.split(b"\r", 1)[1] for m in engine.received}) == 1
    assert [(h[0], h[2].split(":")[0]) for h in _history(store, entry)] == [("retry", f"MSH-10 {first}"),
                                                                              ("delivered", f"MSH-10 {first}")]


def test_only_a_negative_answer_moves_the_msh10(store: Store, engine: Engine) -> None:
    engine.script[:] = ["AE", "silent", "AA"]
    entry = _queue(store)[1]
    for _ in range(3):
        outbox.run_once(store, FAST)
        _make_due(store)
    assert _entry(store, entry).state == "delivered"
    a, b, c = engine.control_ids()
    assert a != b == c
    assert [h[:2] for h in _history(store, entry)] == [("retry", "nak"), ("retry", "io"), ("delivered", "AA")]


def test_an_oru_superseded_while_its_ack_is_awaited_is_not_resent_after_the_correction(store: Store,
                                                                                        engine: Engine) -> None:
    """The reviewer's sequence: the first result's ORU is in flight (the engine files it, its ACK is
    lost) when the correction is queued; the timeout used to put it back to pending and resend it after
    the correction, leaving the EHR on the out-of-date result."""
    engine.script[:] = ["silent"]
    first, stale = _queue(store)
    sender = threading.Thread(target=outbox.run_once, args=(store, FAST))
    sender.start()
    wait_until(lambda: len(engine.received) == 1, 10, 0.02)
    with store.db.session() as session:
        session.get(Job, first).state = "superseded"  # type: ignore[union-attr]
    correction = _queue(store, correction=True, supersedes=first)[1]
    sender.join(10)
    assert _entry(store, stale).state == "dropped"
    assert [h[:2] for h in _history(store, stale)] == [("retry", "io"), ("superseded", "")]
    _make_due(store)
    while outbox.run_once(store, FAST):
        _make_due(store)
    assert _entry(store, correction).state == "delivered"
    assert len(engine.received) == 2 and engine.control_ids()[1].startswith(f"MG{correction[:14]}")
