"""An engine that answers every ORU with ``AA`` and an MSA-2 that is not our MSH-10 (an ACK template that
fills MSA-2 from the engine's own MSH-10), over real MLLP sockets.

It used to be reported as a timeout (``io``, "MLLP exchange failed (TimeoutError)") and re-sent with the
same MSH-10 for the outbox's max age (3 days): every copy was filed again by an engine that does not
de-duplicate, and nothing pointed the interface analyst at the ACKs msgate had discarded."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlmodel import select, update

from msgate.errors import Transient
from msgate.hl7.client import MllpClient
from msgate.results import outbox, outbox_ops, outbox_send
from msgate.results.hl7_out import OrderNumbers, render_oru
from msgate.storage.models import Job, OutboxEntry, Study, utcnow
from msgate.storage.store import Store, open_store
from tests.conftest import make_settings
from tests.integration.mllp_peer import MllpPeer, control_id
from tests.integration.pacs_peers import flair_series, model_result

pytestmark = [pytest.mark.integration]
FAST = outbox.Policy(base_delay=0.05, max_delay=0.1, lease=5.0, poll=0.1, hl7_timeout=0.6)
PATIENT = ("RESULTS", "MRN-R-1")  # the source series' name and id (pacs_peers.flair_series): never logged


@dataclass
class ForeignAckEngine(MllpPeer):
    """Answers each message with ``AA`` whose MSA-2 is the engine's own MSH-10 (``ENG<n>``); the first
    ``honest`` messages get a correct ACK (MSA-2 = their MSH-10); ``repeat_first`` answers every later
    message with the first one's ACK again (a duplicated late ACK); ``silent_at`` are not answered."""

    honest: int = 0
    repeat_first: bool = False
    silent_at: set[int] = field(default_factory=set)  # message numbers (1, 2, ...) never answered
    first: bytes = b""

    def answer(self, message: bytes) -> bytes | None:
        n = len(self.received)
        if n in self.silent_at:
            return None
        own = f"ENG{n}".encode()
        cid = control_id(message)
        self.first = self.first or cid
        msa2 = cid if n <= self.honest else self.first if self.repeat_first else own
        return b"MSH|^~\\&|ENGINE|H|MSGATE|H|2026||ACK^R01^ACK|" + own + b"|P|2.5.1\rMSA|AA|" + msa2 + b"\r"


@pytest.fixture
def engine() -> Iterator[ForeignAckEngine]:
    peer = ForeignAckEngine().start()
    yield peer
    peer.stop()


@pytest.fixture
def store(tmp_path: Path, engine: ForeignAckEngine) -> Iterator[Store]:
    hl7_out = {"host": "127.0.0.1", "port": engine.port}
    st = open_store(make_settings(tmp_path / "home", "sqlite", hl7_out=hl7_out))
    yield st
    st.close()


def _oru_bytes() -> bytes:
    src = flair_series(n=1, rows=8, cols=8)[0]
    settings = make_settings(Path("/nonexistent"), "sqlite", hl7_out={"port": 1})
    er7 = render_oru(model_result((12, 40, 48)), source=src, numbers=OrderNumbers("P1", "F1", "A1"),
                     sr_uid="1.2.3", correction=False, settings=settings)
    return er7.encode()


def _queue(store: Store) -> str:
    with store.db.session() as session:
        study = Study(study_uid_index="s-ack-mismatch")
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, idem_key="j-ack-mismatch", state="done")  # type: ignore[arg-type]
        session.add(job)
        session.flush()
        return outbox.enqueue(store, session, job_id=job.id,
                              objects=[outbox.Rendered("out.oru", _oru_bytes())])[0].id


def _round(store: Store) -> None:
    with store.db.session() as session:
        session.exec(update(OutboxEntry).where(OutboxEntry.state == "pending")  # type: ignore[call-overload]
                     .values(next_attempt_at=utcnow()))
    assert outbox.run_once(store, FAST) == 1


def _history(store: Store, entry_id: str) -> list[tuple[str, str, str]]:
    with store.db.session() as session:
        return [(a.outcome, a.peer_status, a.detail) for a in outbox_ops.attempts_of(session, entry_id)]


def _state(store: Store, entry_id: str) -> str:
    with store.db.session() as session:
        return session.exec(select(OutboxEntry.state).where(OutboxEntry.id == entry_id)).one()


def test_an_ack_for_another_control_id_is_ack_mismatch_not_a_timeout(
        engine: ForeignAckEngine, caplog: pytest.LogCaptureFixture) -> None:
    message = _oru_bytes()
    with (caplog.at_level(logging.WARNING, logger="msgate"),
          MllpClient("127.0.0.1", engine.port, timeout=0.6) as client, pytest.raises(Transient) as caught):
        client.send(message)
    assert caught.value.code == "ack_mismatch"
    text = str(caught.value)
    assert "the engine answered AA for another message control id" in text and "TimeoutError" not in text
    assert "MSA-2 equal to the ACK's own MSH-10" in text  # the template mistake, named for the analyst
    assert "ENG1" not in text  # the foreign MSA-2 itself is not repeated (an engine may put anything there)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("msgate")]
    assert len(warnings) == 1
    assert (warnings[0].code, warnings[0].count) == ("ack_mismatch", 1)  # type: ignore[attr-defined]
    logged = caplog.text + repr([vars(r) for r in warnings])
    assert not any(part in logged for part in PATIENT)


def test_a_late_repeat_of_an_earlier_ack_is_still_a_timeout(engine: ForeignAckEngine) -> None:
    """An ACK of a message sent earlier on the same connection (a repeat, or an application ACK after its
    commit ACK) is not the engine answering this message for another control id."""
    engine.honest, engine.repeat_first = 1, True
    message = _oru_bytes()
    header, rest = message.split(b"\r", 1)
    fields = header.split(b"|")
    fields[9] = b"SECOND"
    second = b"|".join(fields) + b"\r" + rest
    with MllpClient("127.0.0.1", engine.port, timeout=0.6) as client:
        assert client.send(message).code == "AA"
        with pytest.raises(Transient) as caught:
            client.send(second)
    assert caught.value.code == "io" and "TimeoutError" in str(caught.value)


def test_the_outbox_records_ack_mismatch_and_dead_letters_after_the_bound(store: Store,
                                                                          engine: ForeignAckEngine) -> None:
    entry = _queue(store)
    limit = outbox_send.ACK_MISMATCH_LIMIT
    for _ in range(limit - 1):
        _round(store)
        assert _state(store, entry) == "pending"
    _round(store)
    assert _state(store, entry) == "dead"
    history = _history(store, entry)
    assert [h[:2] for h in history] == [("retry", "ack_mismatch")] * (limit - 1) + [("dead", "ack_mismatch")]
    assert all("the engine answered AA for another message control id" in h[2] for h in history)
    assert f"{limit} attempts in a row" in history[-1][2]
    assert len(engine.received) == limit and len(set(engine.control_ids())) == 1  # one MSH-10: no new copies


def test_an_operator_retry_starts_the_count_again(store: Store, engine: ForeignAckEngine) -> None:
    entry = _queue(store)
    for _ in range(outbox_send.ACK_MISMATCH_LIMIT):
        _round(store)
    assert _state(store, entry) == "dead"
    assert outbox_ops.requeue(store, [entry], actor="test") == [entry]
    _round(store)
    assert _state(store, entry) == "pending"
    assert _history(store, entry)[-1][:2] == ("retry", "ack_mismatch")


def test_an_unanswered_attempt_in_between_breaks_the_streak(store: Store, engine: ForeignAckEngine) -> None:
    """Only consecutive mismatches count: a timeout (the engine silent once) in between starts the count
    again."""
    limit = outbox_send.ACK_MISMATCH_LIMIT
    engine.silent_at = {limit - 1}
    entry = _queue(store)
    for _ in range(limit):
        _round(store)
    assert [h[1] for h in _history(store, entry)][limit - 2:] == ["io", "ack_mismatch"]
    assert _state(store, entry) == "pending"
