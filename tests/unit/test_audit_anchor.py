"""Audit chain anchors (msgate.storage.audit_anchor, audit_anchor_check) on both backends.

Before, the head of the chain lived only in the database: a writer deleted the newest records, moved
``audit_head`` back, and ``audit verify`` passed. The scheduler now records the head outside the database
(a log line and an fsynced anchor file), and verify checks every anchor against the chain.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
from pathlib import Path

import pytest
from sqlalchemy import delete
from sqlmodel import col, select

from msgate.config import Settings, load_settings
from msgate.log import SafeFormatter
from msgate.storage import audit, audit_anchor, audit_anchor_check
from msgate.storage.audit_anchor import Anchor, Anchorer
from msgate.storage.audit_anchor_check import AnchorFileError
from msgate.storage.models import AuditEvent, AuditHead
from msgate.storage.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _events(store: Store, n: int) -> None:
    with store.db.session() as s:
        for i in range(n):
            audit.append(s, kind="test.event", actor="t", subject=f"x:{i}", detail={"i": i})


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _head(store: Store) -> audit.Head:
    with store.db.session() as s:
        head = audit.current_head(s)
    assert head is not None
    return head


def _check(store: Store, anchors: list[Anchor]) -> audit_anchor_check.AnchorCheck:
    with store.db.session() as s:
        return audit_anchor_check.check(s, anchors, ["test"])


def _cut(store: Store, keep: int) -> None:
    """The attack: delete every record after ``keep`` and move the head back to it; nothing else changes."""
    with store.db.session() as s:
        s.execute(delete(AuditEvent).where(col(AuditEvent.seq) > keep))
        kept = s.exec(select(AuditEvent).where(AuditEvent.seq == keep)).one()
        head = s.get(AuditHead, 1)
        assert head is not None
        head.seq, head.hash = kept.seq, kept.hash
        s.add(head)


def _rewrite_with_key(store: Store, from_seq: int) -> None:
    """A holder of the key ring edits record ``from_seq`` and recomputes every HMAC after it and the head:
    the chain verifies; only an anchor recorded before shows it."""
    key = audit.key_of(store.db.engine)
    assert key is not None
    with store.db.session() as s:
        rows = s.exec(select(AuditEvent).where(AuditEvent.seq >= from_seq).order_by(col(AuditEvent.seq))).all()
        prev = rows[0].prev_hash
        rows[0].subject = "x:forged"
        for row in rows:
            body = audit.canonical(seq=row.seq, ts=row.ts, kind=row.kind, actor=row.actor, subject=row.subject,
                                   detail=row.detail)
            row.prev_hash = prev
            row.hash = prev = hmac.new(key, prev.encode() + b"|" + body, hashlib.sha256).hexdigest()
            s.add(row)
        head = s.get(AuditHead, 1)
        assert head is not None
        head.hash = prev
        s.add(head)


# --- recording anchors ------------------------------------------------------------------------------


def test_anchors_are_written_on_the_interval_and_only_when_the_head_moved(store: Store, tmp_path: Path) -> None:
    _events(store, 3)
    path, clock = tmp_path / "anchors.jsonl", Clock()
    anchorer = Anchorer(store.db, interval_s=300, path=path, clock=clock)
    first = anchorer.tick()  # due at once: the head when the scheduler starts
    assert first is not None and first.seq == 3 and first.hash == _head(store).hash
    clock.now += 100
    _events(store, 1)
    assert anchorer.tick() is None  # not due yet
    assert [line["seq"] for line in _lines(path)] == [3]
    clock.now += 200
    assert anchorer.tick() is not None
    clock.now += 300
    assert anchorer.tick() is None  # due, but the head did not move: no second line for seq 4
    clock.now += 300
    assert anchorer.tick() is None
    lines = _lines(path)
    assert [line["seq"] for line in lines] == [3, 4]
    head = _head(store)
    assert lines[-1] == {"event": "audit.anchor", "seq": 4, "hash": head.hash, "keyed_from": head.keyed_from,
                         "ts": lines[-1]["ts"]}
    assert isinstance(lines[-1]["ts"], str)


def test_a_clean_stop_writes_one_more_anchor_when_the_head_moved(store: Store, tmp_path: Path) -> None:
    _events(store, 2)
    path, clock = tmp_path / "anchors.jsonl", Clock()
    anchorer = Anchorer(store.db, interval_s=300, path=path, clock=clock)
    anchorer.tick()
    _events(store, 2)
    stopped = anchorer.close()  # long before the next interval
    assert stopped is not None and stopped.seq == 4
    assert [line["seq"] for line in _lines(path)] == [2, 4]
    assert Anchorer(store.db, interval_s=300, path=path, clock=clock).close() is None  # unchanged: nothing
    assert len(_lines(path)) == 2


def test_a_restarted_scheduler_does_not_repeat_the_last_anchor(store: Store, tmp_path: Path) -> None:
    _events(store, 2)
    path = tmp_path / "anchors.jsonl"
    Anchorer(store.db, interval_s=300, path=path, clock=Clock()).tick()
    again = Anchorer(store.db, interval_s=300, path=path, clock=Clock())
    assert again.tick() is None
    assert len(_lines(path)) == 1


def test_interval_zero_turns_anchors_off(store: Store, tmp_path: Path) -> None:
    _events(store, 1)
    path = tmp_path / "anchors.jsonl"
    anchorer = Anchorer(store.db, interval_s=0, path=path, clock=Clock())
    assert anchorer.tick() is None and anchorer.close() is None
    assert not path.exists()


def test_the_anchor_log_line_carries_seq_hash_and_keyed_from(store: Store, tmp_path: Path) -> None:
    """One structured line on the normal (JSON) log, for the SIEM: the allowlist kept none of these fields."""
    _events(store, 2)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(SafeFormatter("json"))
    logger = logging.getLogger("msgate.storage.audit_anchor")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        Anchorer(store.db, interval_s=300, path=None, clock=Clock()).tick()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    anchors = [d for d in docs if d.get("event") == "audit.anchor"]
    head = _head(store)
    assert len(anchors) == 1, docs
    assert (anchors[0]["seq"], anchors[0]["hash"], anchors[0]["keyed_from"]) == (2, head.hash, head.keyed_from)
    assert head.keyed_from == 1
    assert not (tmp_path / "audit-anchors.jsonl").exists()


def test_a_head_that_moved_back_is_logged_as_an_error(store: Store, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    _events(store, 4)
    anchorer = Anchorer(store.db, interval_s=300, path=tmp_path / "a.jsonl", clock=Clock())
    anchorer.tick()
    _cut(store, 2)
    with caplog.at_level(logging.INFO, logger="msgate.storage.audit_anchor"):
        assert anchorer.close() is not None
    assert any(getattr(r, "event", "") == "audit.anchor_mismatch" and r.levelno == logging.ERROR
               for r in caplog.records)


def test_anchor_path_follows_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    assert audit_anchor.anchor_path(load_settings(home=home)) == home / "audit-anchors.jsonl"
    assert load_settings(home=home).audit.anchor_interval_s == 300
    assert audit_anchor.anchor_path(load_settings(home=home, audit={"anchor_file": "x/a.jsonl"})) == home / "x/a.jsonl"
    assert audit_anchor.anchor_path(load_settings(home=home, audit={"anchor_file": "/srv/a.jsonl"})) == Path(
        "/srv/a.jsonl")
    monkeypatch.setenv("MSGATE_AUDIT__ANCHOR_FILE", "")
    monkeypatch.setenv("MSGATE_AUDIT__ANCHOR_INTERVAL_S", "0")
    off: Settings = load_settings(home=home)
    assert audit_anchor.anchor_path(off) is None and off.audit.anchor_interval_s == 0


# --- reading anchor files ---------------------------------------------------------------------------


HASH_A, HASH_B = "a" * 64, "b" * 64


def test_every_kind_of_anchor_file_is_read_and_other_lines_are_skipped(tmp_path: Path) -> None:
    jsonl = tmp_path / "audit-anchors.jsonl"
    jsonl.write_text(Anchor(3, HASH_A, 1, "2026-12-07T10:00:00+00:00").line() + "\n"
                     + Anchor(5, HASH_B, 1, "2026-12-07T10:05:00+00:00").line() + "\n")
    assert [(a.seq, a.hash, a.at) for a in audit_anchor_check.read(jsonl)] == [
        (3, HASH_A, "2026-12-07T10:00:00+00:00"), (5, HASH_B, "2026-12-07T10:05:00+00:00")]
    heads = tmp_path / "heads.json"  # `msgate audit head --json` appended twice: pretty-printed objects
    heads.write_text(json.dumps({"seq": 3, "hash": HASH_A, "keyed_from": 1}, indent=2) + "\n"
                     + json.dumps({"seq": 5, "hash": HASH_B, "keyed_from": None}, indent=2, sort_keys=True) + "\n")
    assert [(a.seq, a.keyed_from, a.at) for a in audit_anchor_check.read(heads)] == [(3, 1, None), (5, None, None)]
    log = tmp_path / "siem.log"
    log.write_text("\n".join([
        '{"ts": "2026-12-07T10:00:00.000+00:00", "level": "INFO", "logger": "msgate.cli.serve_cmd", '
        '"msg": "msgate started", "role": "scheduler"}',
        "plain text from another program",
        '{"ts": "2026-12-07T10:05:00.000+00:00", "level": "INFO", "logger": "msgate.storage.audit_anchor", '
        f'"msg": "audit chain anchor", "event": "audit.anchor", "seq": 7, "hash": "{HASH_A}", "keyed_from": 1}}',
        f'Dec  7 10:10:00 host msgate[42]: {{"event": "audit.anchor", "seq": 9, "hash": "{HASH_B}", '
        '"keyed_from": 1, "ts": "2026-12-07T10:10:00.000+00:00"}',
        '{"level": "ERROR", "event": "audit.anchor_mismatch", "seq": 2, "reason": "last anchored seq 9"}',
        "event=audit.anchor_mismatch seq=2",
        '{"seq": 4, "hash": "not a head", "other": 1}',
        "",
    ]))
    assert [(a.seq, a.at) for a in audit_anchor_check.read(log)] == [(7, "2026-12-07T10:05:00.000+00:00"),
                                                                     (9, "2026-12-07T10:10:00.000+00:00")]


@pytest.mark.parametrize(("content", "said"), [
    ('{"event":"audit.anchor","seq":3,"hash":"' + HASH_A + '","keyed_from":1}\n{"event":"audit.anchor","seq":4,"ha',
     "line 2: names audit.anchor but is not a JSON anchor"),
    ('{"event":"audit.anchor","seq":"3","hash":"' + HASH_A + '","keyed_from":1}\n', "line 1: not a valid audit anchor"),
    ('{"event":"audit.anchor","seq":3,"hash":"xyz","keyed_from":1}\n', "line 1: not a valid audit anchor"),
    ('\n\n{"seq": 3, "hash": "' + HASH_A + '", "keyed_from": "one"}\n', "line 3: not a valid audit anchor"),
    ("just some text\nand more\n", "no audit anchors in"),
    ("", "no audit anchors in"),
])
def test_a_garbled_anchors_file_is_an_error_naming_the_line(tmp_path: Path, content: str, said: str) -> None:
    path = tmp_path / "anchors.jsonl"
    path.write_text(content)
    with pytest.raises(AnchorFileError, match=said) as caught:
        audit_anchor_check.read(path)
    assert str(path) in str(caught.value)


def test_an_unreadable_anchors_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AnchorFileError, match="cannot read the anchors file"):
        audit_anchor_check.read(tmp_path / "missing.jsonl")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(AnchorFileError, match="not UTF-8"):
        audit_anchor_check.read(binary)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert audit_anchor_check.read(empty, required=False) == []


# --- checking the chain against anchors -------------------------------------------------------------


def _anchors_of(store: Store, tmp_path: Path, counts: list[int]) -> list[Anchor]:
    """Append ``counts[i]`` events, anchoring after each batch, as the scheduler would."""
    path, clock = tmp_path / "anchors.jsonl", Clock()
    anchorer = Anchorer(store.db, interval_s=300, path=path, clock=clock)
    for n in counts:
        _events(store, n)
        anchorer.tick()
        clock.now += 300
    return audit_anchor_check.read(path)


def test_an_intact_chain_matches_its_anchors(store: Store, tmp_path: Path) -> None:
    anchors = _anchors_of(store, tmp_path, [2, 3, 1])
    _events(store, 2)  # the chain went on after the last anchor
    result = _check(store, anchors + anchors)  # an anchor seen twice (file and log) counts once
    assert result.ok and result.checked == 3 and result.findings == []


def test_cutting_the_newest_records_off_is_found_against_an_anchor(store: Store, tmp_path: Path) -> None:
    anchors = _anchors_of(store, tmp_path, [3, 2, 2])  # anchors at 3, 5, 7
    _cut(store, 4)
    with store.db.session() as s:
        assert audit.verify(s).ok  # the gap: a shorter chain that is intact in itself
    result = _check(store, anchors)
    assert [(f.kind, f.seq) for f in result.findings] == [("truncated", 5), ("truncated", 7)]
    assert result.findings[0].reason == (f"truncated: anchored record seq 5 (anchored at {anchors[1].at}) is "
                                         "missing; the chain ends at 4")


def test_a_cut_chain_that_went_on_is_found_as_rewritten(store: Store, tmp_path: Path) -> None:
    anchors = _anchors_of(store, tmp_path, [3, 2])  # anchors at 3, 5
    _cut(store, 3)
    _events(store, 4)  # msgate appends again: seq 4.. exist, with other hashes
    result = _check(store, anchors)
    assert [(f.kind, f.seq) for f in result.findings] == [("rewritten", 5)]
    assert result.findings[0].reason == "rewritten: record seq 5 does not have its anchored hash"


def test_a_rewrite_by_a_holder_of_the_key_ring_is_found_against_an_anchor(store: Store, tmp_path: Path) -> None:
    anchors = _anchors_of(store, tmp_path, [2, 2, 2])  # anchors at 2, 4, 6
    _rewrite_with_key(store, 3)
    with store.db.session() as s:
        assert audit.verify(s).ok  # the chain itself cannot show it
    result = _check(store, anchors)
    assert [(f.kind, f.seq) for f in result.findings] == [("rewritten", 4), ("rewritten", 6)]


def test_an_anchor_of_a_moved_keyed_start_is_a_finding(store: Store, tmp_path: Path) -> None:
    _events(store, 2)
    head = _head(store)
    result = _check(store, [Anchor(head.seq, head.hash, 7, None)])
    assert [f.kind for f in result.findings] == ["rekeyed"]
    assert _check(store, [Anchor(head.seq, head.hash, None, None), Anchor(0, "0" * 64, None, None)]).ok
