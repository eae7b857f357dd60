"""Anchors of the audit chain: its head (seq, hash, ``keyed_from``), recorded outside the database.

A database writer can delete the newest audit records and move ``audit_head`` back: what is left is an
intact, shorter chain (:func:`msgate.storage.audit.verify` passes). Every process that runs the scheduler
role therefore records the head every ``audit.anchor_interval_s`` seconds (and once when it stops)

- as one log line, event ``audit.anchor`` (the normal JSON log, shipped to a SIEM), and
- as one fsynced JSON line appended to ``audit.anchor_file`` (default ``home/audit-anchors.jsonl``),

and ``msgate audit verify`` checks each anchor against the chain (:mod:`msgate.storage.audit_anchor_check`).
A head that did not move since the last anchor is not recorded again. No PHI: seq and hashes only.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from msgate.config import Settings
from msgate.storage import audit
from msgate.storage.db import Database

log = logging.getLogger(__name__)

EVENT = "audit.anchor"
DEFAULT_FILE = "audit-anchors.jsonl"
_TAIL_BYTES = 4096  # the last line of an anchor file is well under this


@dataclass(frozen=True)
class Anchor:
    """One recorded head; ``at`` is when it was recorded (None: an ``audit head --json`` output)."""

    seq: int
    hash: str
    keyed_from: int | None
    at: str | None = None

    def line(self) -> str:
        doc = {"event": EVENT, "ts": self.at, "seq": self.seq, "hash": self.hash, "keyed_from": self.keyed_from}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def anchor_path(settings: Settings) -> Path | None:
    """Where anchors are appended: ``audit.anchor_file`` (relative: under home), None when it is empty."""
    name = settings.audit.anchor_file
    if name is None:
        return settings.home / DEFAULT_FILE
    if not name.strip():
        return None
    path = Path(name).expanduser()
    return path if path.is_absolute() else settings.home / path


def append_line(path: Path, anchor: Anchor) -> None:
    """Append one anchor line and fsync it (and the folder, when the file is new). A file that does not end
    with a newline (a write cut short) gets one first, so the anchor starts a line of its own. A write that
    does not take the whole line raises ``OSError`` (what did land is a torn line; verify names it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        _write_all(fd, ("\n" if torn else "") + anchor.line() + "\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _write_all(fd: int, text: str) -> None:
    """``os.write`` until all of ``text`` is written: a write may take less than it is given."""
    data = memoryview(text.encode())
    while data:
        written = os.write(fd, data)
        if written <= 0:
            raise OSError(errno.ENOSPC, "the anchor file took no more bytes")
        data = data[written:]


def last_written(path: Path) -> Anchor | None:
    """The last anchor in ``path`` (what a restarted scheduler compares with), None when there is none or
    it cannot be read: then the next anchor is written whatever it is."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - _TAIL_BYTES))
            lines = fh.read().decode("utf-8", "replace").splitlines()
        doc = json.loads(lines[-1])
        return Anchor(int(doc["seq"]), str(doc["hash"]), doc.get("keyed_from"), doc.get("ts"))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


class Anchorer:
    """Records the head when due (:meth:`tick`, from the scheduler's loop) and at a stop (:meth:`close`)."""

    def __init__(self, db: Database, *, interval_s: float, path: Path | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.db, self.interval_s, self.path, self.clock = db, interval_s, path, clock
        self.last: Anchor | None = last_written(path) if path is not None and interval_s > 0 else None
        self.due = clock()

    @classmethod
    def for_settings(cls, db: Database, settings: Settings) -> Anchorer:
        return cls(db, interval_s=settings.audit.anchor_interval_s, path=anchor_path(settings))

    def tick(self) -> Anchor | None:
        """Record the head if the interval has passed since the last look; what was recorded, if anything."""
        if self.interval_s <= 0 or self.clock() < self.due:
            return None
        self.due = self.clock() + self.interval_s
        return self.record()

    def close(self) -> Anchor | None:
        """The anchor of a clean stop (none when anchors are off or the head did not move)."""
        return self.record() if self.interval_s > 0 else None

    def record(self) -> Anchor | None:
        """Log and append the head unless it is the last one recorded. Never raises: a database or disk
        that fails is logged, and the next tick tries again."""
        try:
            with self.db.session() as session:
                head = audit.current_head(session)
        except Exception:
            log.warning("audit anchor skipped: the head could not be read", extra={"reason": "database"})
            return None
        if head is None:
            return None
        anchor = Anchor(head.seq, head.hash, head.keyed_from, datetime.now(UTC).isoformat(timespec="seconds"))
        if self.last is not None and (anchor.seq, anchor.hash, anchor.keyed_from) == (
                self.last.seq, self.last.hash, self.last.keyed_from):
            return None
        self._warn_if_moved_back(anchor)
        log.info("audit chain anchor", extra=_fields(anchor))
        if self.path is not None:
            try:
                append_line(self.path, anchor)
            except OSError as exc:
                log.warning("audit anchor not written to its file: the next tick tries again", extra={
                    "error_type": type(exc).__name__, "reason": exc.strerror})
                return anchor  # self.last unchanged: the next tick records this head again, in the file too
        self.last = anchor
        return anchor

    def _warn_if_moved_back(self, anchor: Anchor) -> None:
        """A head behind the last anchor (or at its seq with another hash, or keyed from elsewhere) means
        records were cut off or rewritten since: say so now, not only at the next ``audit verify``."""
        last = self.last
        if last is None:
            return
        if anchor.seq < last.seq or (anchor.seq == last.seq and anchor.hash != last.hash) or (
                last.keyed_from is not None and anchor.keyed_from != last.keyed_from):
            log.error("audit chain head moved back or changed since the last anchor: run msgate audit verify",
                      extra={"event": "audit.anchor_mismatch", "seq": anchor.seq,
                             "reason": f"last anchored seq {last.seq}"})


def _fields(anchor: Anchor) -> dict[str, Any]:
    """The ``extra`` of the anchor log line (msgate.log allowlists these keys)."""
    return {"event": EVENT, "seq": anchor.seq, "hash": anchor.hash, "keyed_from": anchor.keyed_from}
