"""Audit chain anchors (msgate.storage.audit_anchor, audit_anchor_check) on both backends.

Before, the head of the chain lived only in the database: a writer deleted the newest records, moved
``audit_head`` back, and ``audit verify`` passed. The scheduler now records the head outside the database
(a log line and an fsynced anchor file), and verify checks every anchor against the chain.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from msgate.cli.app import app
from msgate.config import Settings, load_settings
from msgate.log import SafeFormatter
from msgate.storage import audit, audit_anchor, audit_anchor_check
from msgate.storage.audit_anchor import Anchor, Anchorer
from msgate.storage.audit_anchor_check import AnchorFileError
from msgate.storage.store import Store
from tests import audit_forgery as forgery


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
        forgery.cut(s, keep)


def _rewrite_with_key(store: Store, from_seq: int) -> None:
    """A holder of the key ring edits record ``from_seq`` and recomputes every HMAC after it and the head:
    the chain verifies; only an anchor recorded before shows it."""
    key = audit.key_of(store.db.engine)
    assert key is not None
    with store.db.session() as s:
        forgery.rewrite(s, from_seq, key=key)


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


def test_a_torn_last_line_gets_its_own_line_before_the_next_anchor(store: Store, tmp_path: Path) -> None:
    """A write cut short (full disk, a crash) left a line without its newline: the next anchor was glued
    onto it, and neither could be read."""
    _events(store, 2)
    head = _head(store)
    kept = Anchor(head.seq, head.hash, head.keyed_from, "2026-12-07T10:00:00+00:00")
    path = tmp_path / "anchors.jsonl"
    path.write_text(kept.line() + "\n" + kept.line()[:40])
    _events(store, 1)
    new = Anchorer(store.db, interval_s=300, path=path, clock=Clock()).tick()
    assert new is not None and new.seq == 3
    assert path.read_text().split("\n") == [kept.line(), kept.line()[:40], new.line(), ""]
    assert audit_anchor.last_written(path) == new  # a restarted scheduler compares with it
    read = audit_anchor_check.read(path)
    assert [a.seq for a in read.anchors] == [2, 3] and [g.line for g in read.garbled] == [2]
    assert _check(store, read.anchors).ok


def test_a_short_write_is_completed_and_a_failed_one_is_raised(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``os.write`` may write less than it was given; the rest used to be dropped without a word."""
    path, real = tmp_path / "anchors.jsonl", os.write
    first, second = Anchor(3, HASH_A, 1, "2026-12-07T10:00:00+00:00"), Anchor(5, HASH_B, 1, None)
    with monkeypatch.context() as m:
        m.setattr(os, "write", lambda fd, data: real(fd, bytes(data)[:7]))
        audit_anchor.append_line(path, first)
    assert path.read_text() == first.line() + "\n"
    sizes = iter([40])

    def full_disk(fd: int, data: bytes) -> int:
        size = next(sizes, None)
        if size is None:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bytes(data)[:size])

    with monkeypatch.context() as m:
        m.setattr(os, "write", full_disk)
        with pytest.raises(OSError):
            audit_anchor.append_line(path, second)
    assert path.read_text() == first.line() + "\n" + second.line()[:40]
    audit_anchor.append_line(path, second)  # space again: the next anchor starts a line of its own
    read = audit_anchor_check.read(path)
    assert [a.seq for a in read.anchors] == [3, 5] and [g.line for g in read.garbled] == [2]
    with monkeypatch.context() as m:
        m.setattr(os, "write", lambda fd, data: 0)
        with pytest.raises(OSError):
            audit_anchor.append_line(path, first)  # a write that makes no progress does not loop forever


def test_an_anchor_the_file_did_not_take_is_written_at_the_next_tick(store: Store, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _events(store, 2)
    path, clock = tmp_path / "anchors.jsonl", Clock()
    anchorer = Anchorer(store.db, interval_s=300, path=path, clock=clock)

    def full_disk(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "write", full_disk)
        assert anchorer.tick() is not None  # the log line still went out
    assert _lines(path) == []
    clock.now += 300
    again = anchorer.tick()  # the head did not move, but the file does not have it yet
    assert again is not None and [line["seq"] for line in _lines(path)] == [2]
    clock.now += 300
    assert anchorer.tick() is None


# --- reading anchor files ---------------------------------------------------------------------------


HASH_A, HASH_B = "a" * 64, "b" * 64


def test_every_kind_of_anchor_file_is_read_and_other_lines_are_skipped(tmp_path: Path) -> None:
    jsonl = tmp_path / "audit-anchors.jsonl"
    jsonl.write_text(Anchor(3, HASH_A, 1, "2026-12-07T10:00:00+00:00").line() + "\n"
                     + Anchor(5, HASH_B, 1, "2026-12-07T10:05:00+00:00").line() + "\n")
    assert [(a.seq, a.hash, a.at) for a in audit_anchor_check.read(jsonl).anchors] == [
        (3, HASH_A, "2026-12-07T10:00:00+00:00"), (5, HASH_B, "2026-12-07T10:05:00+00:00")]
    heads = tmp_path / "heads.json"  # `msgate audit head --json` appended twice: pretty-printed objects
    heads.write_text(json.dumps({"seq": 3, "hash": HASH_A, "keyed_from": 1}, indent=2) + "\n"
                     + json.dumps({"seq": 5, "hash": HASH_B, "keyed_from": None}, indent=2, sort_keys=True) + "\n")
    assert [(a.seq, a.keyed_from, a.at) for a in audit_anchor_check.read(heads).anchors] == [(3, 1, None), (5, None, None)]
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
    read = audit_anchor_check.read(log)
    assert [(a.seq, a.at) for a in read.anchors] == [(7, "2026-12-07T10:05:00.000+00:00"),
                                                     (9, "2026-12-07T10:10:00.000+00:00")]
    assert read.garbled == []


GOOD_3 = '{"event":"audit.anchor","seq":3,"hash":"' + HASH_A + '","keyed_from":1}'
GOOD_5 = '{"event":"audit.anchor","seq":5,"hash":"' + HASH_B + '","keyed_from":1}'


@pytest.mark.parametrize(("content", "seqs", "line", "said"), [
    (GOOD_3 + '\n{"event":"audit.anchor","seq":4,"ha', [3], 2, "names audit.anchor but is not a JSON anchor"),
    (GOOD_3 + '\n{"event":"audit.anchor","seq":4,"ha\n' + GOOD_5 + "\n", [3, 5], 2, "names audit.anchor but is not"),
    (GOOD_3 + '\n{"event":"audit.anchor","seq":"4","hash":"' + HASH_A + '","keyed_from":1}\n' + GOOD_5, [3, 5], 2,
     "not a valid audit anchor"),
    (GOOD_3 + '\n\n{"seq": 4, "hash": "' + HASH_A + '", "keyed_from": "one"}\n' + GOOD_5 + "\n", [3, 5], 3,
     "not a valid audit anchor"),
    (GOOD_3 + "\nevent=audit.anchor seq=4\n" + GOOD_5 + "\n", [3, 5], 2, "names audit.anchor but is not"),
])
def test_a_garbled_line_is_named_and_the_other_anchors_are_read(tmp_path: Path, content: str, seqs: list[int],
                                                                line: int, said: str) -> None:
    """A torn write (a full disk) or a damaged line costs that line only: it used to end ``audit verify``
    (exit 2) for every anchor in the file, for good."""
    path = tmp_path / "anchors.jsonl"
    path.write_text(content)
    read = audit_anchor_check.read(path)
    assert [a.seq for a in read.anchors] == seqs
    assert [(g.line, g.source) for g in read.garbled] == [(line, str(path))]
    assert said in read.garbled[0].reason
    assert f"{path}, line {line}: " in read.garbled[0].text


@pytest.mark.parametrize(("content", "said"), [
    ('{"event":"audit.anchor","seq":"3","hash":"' + HASH_A + '","keyed_from":1}\n', "line 1: not a valid audit anchor"),
    ('{"event":"audit.anchor","seq":3,"hash":"xyz","keyed_from":1}\n', "line 1: not a valid audit anchor"),
    ('\n\n{"seq": 3, "hash": "' + HASH_A + '", "keyed_from": "one"}\n', "line 3: not a valid audit anchor"),
    ('{"event":"audit.anchor","seq":4,"ha', "line 1: names audit.anchor but is not a JSON anchor"),
    ("just some text\nand more\n", "no audit anchors in"),
    ("", "no audit anchors in"),
])
def test_a_file_without_one_good_anchor_is_an_error_naming_the_line(tmp_path: Path, content: str,
                                                                    said: str) -> None:
    path = tmp_path / "anchors.jsonl"
    path.write_text(content)
    with pytest.raises(AnchorFileError, match=said) as caught:
        audit_anchor_check.read(path)
    assert str(path) in str(caught.value)
    if "line" in said:  # the configured file (not required) that is all garbled is one too
        with pytest.raises(AnchorFileError, match=said):
            audit_anchor_check.read(path, required=False)


def test_anchors_glued_onto_a_torn_line_are_still_read(tmp_path: Path) -> None:
    """A file written before the fix: the next anchor was appended onto the torn line."""
    path = tmp_path / "anchors.jsonl"
    path.write_text(GOOD_3 + '\n{"event":"audit.anchor","seq":4,"ha' + GOOD_5 + "\n")
    read = audit_anchor_check.read(path)
    assert [a.seq for a in read.anchors] == [3, 5]
    assert [g.line for g in read.garbled] == [2]


def test_an_unreadable_anchors_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AnchorFileError, match="cannot read the anchors file"):
        audit_anchor_check.read(tmp_path / "missing.jsonl")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(AnchorFileError, match="not UTF-8"):
        audit_anchor_check.read(binary)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert audit_anchor_check.read(empty, required=False).anchors == []


# --- checking the chain against anchors -------------------------------------------------------------


def _anchors_of(store: Store, tmp_path: Path, counts: list[int]) -> list[Anchor]:
    """Append ``counts[i]`` events, anchoring after each batch, as the scheduler would."""
    path, clock = tmp_path / "anchors.jsonl", Clock()
    anchorer = Anchorer(store.db, interval_s=300, path=path, clock=clock)
    for n in counts:
        _events(store, n)
        anchorer.tick()
        clock.now += 300
    return audit_anchor_check.read(path).anchors


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


# --- audit verify with a garbled anchor line ---------------------------------------------------------


def _verify(settings: Settings, *args: str) -> Result:
    env = {"MSGATE_HOME": str(settings.home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
           "MSGATE_STORAGE__PURGE_FREE_BYTES": "0"}
    if settings.database_url:
        env |= {"MSGATE_DATABASE_URL": settings.database_url, "MSGATE_STORAGE__BLOB_BACKEND": "postgres"}
    return CliRunner().invoke(app, ["audit", "verify", *args], env=env)


def test_verify_names_a_garbled_line_and_checks_the_other_anchors(store: Store, settings: Settings,
                                                                 tmp_path: Path) -> None:
    """The configured anchor file with a torn line in the middle: verify used to exit 2 from then on."""
    anchors = _anchors_of(store, tmp_path, [2, 2])  # anchors at 2 and 4
    path = settings.home / "audit-anchors.jsonl"
    path.write_text(anchors[0].line() + "\n" + anchors[1].line()[:50] + "\n" + anchors[1].line() + "\n")
    out = _verify(settings)
    said = " ".join(out.output.split())
    assert out.exit_code == 0, out.output
    assert f"checked against 2 anchors from {path}" in said
    assert f"warning: {path}, line 2: names audit.anchor but is not a JSON anchor" in said
    assert "1 garbled anchor line skipped" in said
    doc = json.loads(_verify(settings, "--json").stdout)
    assert doc["ok"] is True and doc["anchors"]["checked"] == 2
    assert doc["anchors"]["garbled"] == [{"source": str(path), "line": 2, "reason": doc["anchors"]["garbled"][0]
                                          ["reason"]}]
    _cut(store, 3)  # the others are still checked: the cut is found
    cut = _verify(settings)
    assert cut.exit_code == 1 and "truncated: anchored record seq 4" in " ".join(cut.output.split())
    given = tmp_path / "given.jsonl"  # a file given with --anchors is read the same way
    given.write_text(anchors[1].line()[:50] + "\n" + anchors[0].line() + "\n")
    assert _verify(settings, "--anchors", str(given)).exit_code == 0
    given.write_text(anchors[1].line()[:50] + "\n")  # no anchor left in it: the wrong file, or all torn
    bad = _verify(settings, "--anchors", str(given))
    assert bad.exit_code == 2 and "line 1: names audit.anchor" in " ".join(bad.output.split())
