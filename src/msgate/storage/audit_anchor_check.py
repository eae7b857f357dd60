"""``msgate audit verify`` against anchors: heads of the audit chain recorded outside the database.

An anchor file may be the scheduler's ``audit-anchors.jsonl``, a file of ``msgate audit head --json``
outputs (pretty-printed, one after the other), or a log export in which JSON lines with
``"event": "audit.anchor"`` are mixed with other lines (those are skipped; a syslog prefix before the
JSON is allowed). For every anchor the record at its seq must still exist with its hash:

- a seq past the chain's head: the newest records were cut off (``truncated``);
- a seq inside the chain with no record: ``missing`` (:func:`msgate.storage.audit.verify` names it too);
- another hash at that seq: the record, or the chain up to it, was ``rewritten``;
- a ``keyed_from`` other than the chain's: where the keyed part starts moved (``rekeyed``).

A line that names an anchor but is not one (a write cut short by a full disk, a damaged line) is
``garbled``: named with its line number and skipped, and the file's other anchors are still checked. A
file that cannot be read, or that holds no anchor at all, is an error (:class:`AnchorFileError`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from msgate.errors import ConfigError
from msgate.storage import audit
from msgate.storage.audit_anchor import EVENT, Anchor
from msgate.storage.models import AuditEvent, AuditHead

_MENTION = re.compile(re.escape(EVENT) + r"(?![\w.])")  # audit.anchor, not audit.anchor_mismatch
_HASH = re.compile(r"^[0-9a-f]{64}$")
_HEAD_KEYS = frozenset({"seq", "hash", "keyed_from"})  # what `msgate audit head --json` prints
_CHUNK = 500


class AnchorFileError(ConfigError):
    """An anchors file that cannot be read, or holds no anchor (exit 2)."""


class _NotAnAnchor(Exception):
    """A line that names an anchor but is not one (internal: :func:`_scan` records it and goes on)."""


@dataclass(frozen=True)
class Garbled:
    """A line of ``source`` that names an anchor but is not one: skipped, and named."""

    source: str
    line: int
    reason: str

    @property
    def text(self) -> str:
        return f"{self.source}, line {self.line}: {self.reason}"


@dataclass(frozen=True)
class AnchorFile:
    """What :func:`read` found in one file: its anchors in file order and its garbled lines."""

    anchors: list[Anchor]
    garbled: list[Garbled]


@dataclass(frozen=True)
class Finding:
    kind: str  # truncated | missing | rewritten | rekeyed
    seq: int
    reason: str
    anchored_at: str | None


@dataclass(frozen=True)
class AnchorCheck:
    sources: list[str]
    checked: int
    findings: list[Finding]
    garbled: list[Garbled] = field(default_factory=list)  # skipped: not findings, the verdict is on the rest

    @property
    def ok(self) -> bool:
        return not self.findings

    def as_json(self) -> dict[str, Any]:
        return {"sources": self.sources, "checked": self.checked, "ok": self.ok,
                "findings": [asdict(f) for f in self.findings], "garbled": [asdict(g) for g in self.garbled]}


def read(path: Path, *, required: bool = True) -> AnchorFile:
    """The anchors in ``path`` and its garbled lines. An error: a file that cannot be read, one that names
    anchors only in garbled lines, and (``required``: a file given by name) one with no anchor at all."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise AnchorFileError(f"cannot read the anchors file {path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise AnchorFileError(f"the anchors file {path} is not UTF-8 text") from None
    anchors: list[Anchor] = []
    garbled: list[Garbled] = []
    for item in _scan(text, str(path)):
        if isinstance(item, Anchor):
            anchors.append(item)
        else:
            garbled.append(item)
    if not anchors and garbled:
        more = f" (and {len(garbled) - 1} more garbled lines)" if len(garbled) > 1 else ""
        raise AnchorFileError(f"no audit anchors in {path}: line {garbled[0].line}: {garbled[0].reason}{more}")
    if required and not anchors:
        raise AnchorFileError(f"no audit anchors in {path}: expected lines of audit-anchors.jsonl, outputs of "
                              f"`msgate audit head --json` or JSON log lines with \"event\": \"{EVENT}\"")
    return AnchorFile(anchors, garbled)


def _scan(text: str, source: str) -> Iterator[Anchor | Garbled]:
    """Each JSON object that is an anchor, in file order, and each line that names one but is not one; other
    lines are skipped. A line torn before the next anchor was appended onto it (files written before
    :func:`msgate.storage.audit_anchor.append_line` ended a torn line first) still yields that anchor."""
    decoder = json.JSONDecoder()
    pos, end = 0, len(text)
    while pos < end:
        eol = text.find("\n", pos)
        eol = end if eol < 0 else eol
        brace, stop = text.find("{", pos, eol), eol + 1
        doc: Any = None
        while brace >= 0 and doc is None:
            try:
                doc, stop = decoder.raw_decode(text, brace)
            except json.JSONDecodeError:
                brace = text.find("{", brace + 1, eol)  # a torn object: maybe another starts after it
        torn_end = brace if doc is not None else eol
        if text.find("{", pos, torn_end) >= 0 or doc is None:  # text before the object, or no object at all
            if _MENTION.search(text, pos, torn_end):
                yield Garbled(source, _line_no(text, pos), f"names {EVENT} but is not a JSON anchor (garbled or "
                              "cut short)")
        if doc is None:
            pos = eol + 1
            continue
        try:
            anchor = _anchor(doc)
        except _NotAnAnchor as exc:
            yield Garbled(source, _line_no(text, brace), str(exc))
        else:
            if anchor is not None:
                yield anchor
        pos = stop


def _line_no(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _anchor(doc: Any) -> Anchor | None:
    """The anchor ``doc`` is (an anchor line or log line, or an ``audit head --json`` output), None when it is
    some other JSON object; :class:`_NotAnAnchor` when it claims to be one and is not."""
    if not isinstance(doc, dict):
        return None
    if doc.get("event") != EVENT and not ("event" not in doc and set(doc) == _HEAD_KEYS):
        return None
    seq, digest, keyed, at = doc.get("seq"), doc.get("hash"), doc.get("keyed_from"), doc.get("ts")
    valid = (type(seq) is int and seq >= 0 and isinstance(digest, str) and _HASH.match(digest) is not None
             and (keyed is None or (type(keyed) is int and keyed >= 1)) and (at is None or isinstance(at, str)))
    if not valid:
        raise _NotAnAnchor("not a valid audit anchor (seq, a 64-digit hex hash, keyed_from)")
    return Anchor(seq, digest, keyed, at)


def check(session: Session, anchors: Sequence[Anchor], sources: Sequence[str],
          garbled: Sequence[Garbled] = ()) -> AnchorCheck:
    """Compare each distinct anchor with the committed chain; findings in seq order (the first is named).
    ``garbled``: the lines the files' reading skipped, carried into the result."""
    distinct: dict[tuple[int, str, int | None], Anchor] = {}
    for anchor in anchors:
        distinct.setdefault((anchor.seq, anchor.hash, anchor.keyed_from), anchor)
    head = session.get(AuditHead, 1)
    end = head.seq if head is not None else 0
    keyed = audit.keyed_start(session)
    hashes = _hashes(session, sorted({seq for seq, _, _ in distinct if 0 < seq <= end}))
    findings = [f for a in sorted(distinct.values(), key=lambda a: a.seq)
                if (f := _finding(a, end, keyed, hashes)) is not None]
    return AnchorCheck(list(sources), len(distinct), findings, list(garbled))


def _hashes(session: Session, seqs: list[int]) -> dict[int, str]:
    found: dict[int, str] = {}
    for i in range(0, len(seqs), _CHUNK):
        rows = session.exec(select(AuditEvent.seq, AuditEvent.hash).where(
            col(AuditEvent.seq).in_(seqs[i:i + _CHUNK]))).all()
        found.update({int(seq): str(digest) for seq, digest in rows})
    return found


def _finding(anchor: Anchor, end: int, keyed: int | None, hashes: dict[int, str]) -> Finding | None:
    at = f" (anchored at {anchor.at})" if anchor.at else ""
    if anchor.seq == 0:  # the head of an empty chain: nothing to compare
        return None
    if anchor.seq > end:
        return Finding("truncated", anchor.seq, f"truncated: anchored record seq {anchor.seq}{at} is missing; "
                       f"the chain ends at {end}", anchor.at)
    if anchor.seq not in hashes:
        return Finding("missing", anchor.seq, f"missing: anchored record seq {anchor.seq}{at} is not in the chain",
                       anchor.at)
    if hashes[anchor.seq] != anchor.hash:
        return Finding("rewritten", anchor.seq, f"rewritten: record seq {anchor.seq} does not have its anchored "
                       "hash", anchor.at)
    if anchor.keyed_from is not None and keyed != anchor.keyed_from:
        now = f"seq {keyed}" if keyed is not None else "no record"
        return Finding("rekeyed", anchor.seq, f"rekeyed: the chain was keyed from seq {anchor.keyed_from} when "
                       f"record seq {anchor.seq} was anchored{at}; it is keyed from {now} now", anchor.at)
    return None
