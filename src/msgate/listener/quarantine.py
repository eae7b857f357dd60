"""The DICOM journal's quarantine: acknowledged instances that could not be indexed, kept encrypted.

An instance answered 0x0000 is in the listener's commit journal, and its sender may have deleted its copy.
One whose indexing keeps failing for a reason that is not transient (a value the database refuses, a bug)
stayed in the journal for good: its segment was never deleted, and the next start's recovery raised before
the port opened, so the ``dicom`` role crash-looped. Such a record is now moved here instead:

* ``MSGATE_HOME/dicom-journal/quarantine/<id>.jnl`` is a journal segment of its own, holding the record
  exactly as the journal held it (encrypted the same way, its data key wrapped by the key ring's KEK; read
  with :func:`msgate.storage.journal.read_segment`); ``<id>.json`` beside it holds what :func:`entries`
  lists (the reason, the association, the journal segment: internal ids only, no PHI);
* it is audited ``instance.quarantined`` (subject ``quarantine:<id>``) before the journal counts the
  record as handled, so its segment can go;
* nothing is deleted: after a fix, :func:`msgate.listener.indexer.reindex_quarantined` (``msgate studies
  quarantine --reindex``, with the dicom role stopped) indexes it and only then removes its files.

While records are here the dicom role's heartbeat reports them and ``msgate status`` says degraded.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from msgate.errors import MsgateError
from msgate.listener.record import decode_record
from msgate.storage import audit
from msgate.storage.blobs import fsync_dir
from msgate.storage.journal import Journal
from msgate.storage.store import Store

log = logging.getLogger(__name__)

FOLDER = "quarantine"
JOURNAL_FOLDER = "dicom-journal"


@dataclass(frozen=True)
class Entry:
    id: str
    path: Path
    size: int
    quarantined_at: datetime
    reason: str
    assoc_id: str | None
    calling_aet: str

    def doc(self) -> dict[str, Any]:
        """What ``msgate studies quarantine`` shows (no PHI)."""
        return {"id": self.id, "quarantined_at": self.quarantined_at.isoformat(timespec="seconds"),
                "reason": self.reason, "assoc_id": self.assoc_id, "calling_aet": self.calling_aet,
                "bytes": self.size}


def folder(home: Path) -> Path:
    return home / JOURNAL_FOLDER / FOLDER


def reason_of(exc: BaseException) -> str:
    """What may be said about a failure: msgate's own code, else the exception type (a driver's message,
    and a library's error code, may quote values)."""
    return exc.code if isinstance(exc, MsgateError) else type(exc).__name__


def put(store: Store, raw: bytes, *, reason: str, actor: str, segment: str | None = None) -> str:
    """Quarantine one journal record (``raw``, from journal segment ``segment`` where known); returns its id.

    The record is durable here, and audited, before this returns: only then may the caller count it as
    handled. If the audit fails (the database away) its file is removed again and the error propagates:
    the record stays in the journal and is tried again (next start)."""
    try:
        calling_aet, assoc_id, _ = decode_record(raw)
    except (ValueError, struct.error):
        calling_aet, assoc_id = "", None
    directory = folder(store.settings.home)
    jnl = Journal(directory, store.ring)  # its own lock (quarantine.lock): one writer at a time
    try:
        name = jnl.append([raw])  # written, fdatasync'ed, its folder entry synced
    finally:
        jnl.close()  # not counted as indexed: the segment stays
    qid = name.removesuffix(".jnl")
    meta = {"reason": reason[:64], "assoc_id": assoc_id, "calling_aet": calling_aet[:16], "segment": segment,
            "quarantined_at": datetime.now(UTC).isoformat(timespec="seconds")}
    _write_meta(directory / f"{qid}.json", meta)
    try:
        with store.db.session() as session:
            audit.append(session, kind="instance.quarantined", actor=actor, subject=f"quarantine:{qid}",
                         detail={k: v for k, v in meta.items() if k != "quarantined_at"})
    except BaseException:
        remove(store.settings.home, qid)
        raise
    log.error("acknowledged instance could not be indexed: quarantined (encrypted) until re-indexed; see "
              "msgate studies quarantine", extra={"reason": reason, "assoc_id": assoc_id, "role": "dicom"})
    return qid


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Best effort: the record itself is already safe, and listed without its reason if this fails."""
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, path)
    except OSError:
        log.warning("quarantine note not written", extra={"reason": "io"})


def entries(home: Path) -> list[Entry]:
    """The quarantined records, oldest first."""
    out = []
    for path in sorted(folder(home).glob("*.jnl"), key=lambda p: p.stat().st_mtime):
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            meta = {}
        stat = path.stat()
        out.append(Entry(path.stem, path, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC),
                         str(meta.get("reason") or "unknown"), meta.get("assoc_id"),
                         str(meta.get("calling_aet") or "")))
    return out


def count(home: Path) -> int:
    return sum(1 for _ in folder(home).glob("*.jnl"))


def remove(home: Path, qid: str) -> None:
    """Delete a quarantined record and its note (after it was indexed, or when its write was undone)."""
    directory = folder(home)
    for suffix in (".jnl", ".json"):
        (directory / f"{qid}{suffix}").unlink(missing_ok=True)
    fsync_dir(directory)
