"""Is a new version of an instance only another encoding of the version it replaces? Decided once, kept.

A PACS or router often re-sends a study (a re-route, a migration, a "send again" click), compressed
(JPEG-LS, JPEG 2000, RLE, deflated) or not. Identical bytes are a duplicate; other bytes for a known SOP
Instance UID become a new version (:mod:`msgate.storage.index_dicom`). The scheduler's change check hashed
``Instance.content_hash``, the bytes as received, so a lossless re-encoding ran the study again and its
result went out as a correction of an identical result.

:func:`settle` decides each new version against the version it replaces and records the identity the
change check uses in ``Instance.change_hash``:

* **the same data set** (:func:`compare`): every element outside the file meta equal, compared by value
  (implicit VR little endian bytes, so a private element read as UN from an implicit VR copy equals its
  explicit VR twin), group lengths, the encapsulation's offset tables and trailing padding aside; and the
  pixel values pydicom decodes, frame by frame, identical. ``change_hash`` = the previous version's identity
  (a chain of re-encodings keeps the first one's): no new job. Audited as ``instance.reencoded``.
* **anything else**: an element or a pixel changed, the new version uses a transfer syntax that only codes
  lossily (JPEG baseline/extended, MPEG, HEVC, unknown), or either body cannot be read or decoded (a
  purged body included). ``change_hash`` = its own ``content_hash``: a real change, it runs again as it
  always did. Audited as ``instance.changed`` with the reason (never a value).

A lossy re-encoding in a transfer syntax that may be lossless (JPEG-LS near-lossless, JPEG 2000, HTJ2K)
changes pixel values, so the decoded comparison catches it; one whose values came out identical is the same
image (an encoder that declares it lossy sets Lossy Image Compression, an element that then differs).

``change_hash`` is NULL on a first version (its content hash is its identity) and on a later version not
decided yet, which the change check takes as changed (the behaviour before this module). The DICOM indexer
process decides right after the batch that recorded the versions commits and before the listener hears of
them, so before their study can be ready again; the first store of an instance never comes here.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import groupby, zip_longest
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.pixels import iter_pixels
from sqlalchemy import update
from sqlmodel import col, select

from msgate.storage import audit
from msgate.storage.models import Instance

if TYPE_CHECKING:
    from msgate.storage.store import Store

log = logging.getLogger(__name__)

# Transfer syntaxes that can carry the exact values: uncompressed ones, RLE, lossless JPEG, and the codecs
# that may be lossless (JPEG-LS, JPEG 2000, HTJ2K, JPEG XL lossless), where the decoded values decide. A
# new version in any other one (JPEG baseline/extended, MPEG, HEVC, lossy JPEG XL, one unknown here) is a
# lossy re-encoding or not known to be exact: a change, without decoding.
EXACT_CAPABLE = frozenset({
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.98", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",  # JPEG lossless (process 14, SV1)
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",  # JPEG-LS lossless, near-lossless
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.4.110",  # JPEG XL lossless
})
# Elements whose encoding follows the transfer syntax, not the data: Pixel Data (compared decoded), the
# extended offset table and its lengths, Data Set Trailing Padding. Group lengths (gggg,0000) and the
# file meta (group 0002) are left out too.
ENCODING_ONLY = frozenset({0x7FE00010, 0x7FE00001, 0x7FE00002, 0xFFFCFFFC})
# A codec may store colour in another space (JPEG 2000's reversible colour transform, YBR for JPEG);
# pydicom decodes each to RGB, so between two colour interpretations the decoded values decide. Between
# MONOCHROME1 and MONOCHROME2 (inverted display) the element itself is a change.
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420"})
COLOUR_LAYOUT = frozenset({0x00280004, 0x00280006})  # Photometric Interpretation, Planar Configuration


@dataclass(frozen=True)
class Decision:
    instance_id: int
    previous_id: int | None
    version: int
    change_hash: str
    equivalent: bool
    reason: str  # "reencoded", or why not: lossy, elements, pixels, unreadable, undecodable, no_previous
    transfer_syntaxes: tuple[str, str]  # (previous, new)


@dataclass(frozen=True)
class _Row:
    id: int
    sop_uid_index: str
    version: int
    content_hash: str
    change_hash: str | None
    blob_id: str
    transfer_syntax: str


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def _colour(ds: Dataset) -> bool:
    return str(ds.get("PhotometricInterpretation", "")).strip() in COLOUR


def _elements(ds: Dataset, skip: frozenset[int]) -> bytes:
    """The data set's elements outside ``skip``, group 0002 and group lengths, as implicit VR little endian
    bytes: tag, length and value only, so the VR a copy was read with (UN or the dictionary's) and the
    defined or undefined lengths it was sent with do not count."""
    kept = Dataset()
    for elem in ds:
        if elem.tag.group == 0x0002 or elem.tag.element == 0 or int(elem.tag) in skip:
            continue
        kept.add(elem)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, True
    write_dataset(out, kept)
    return bytes(out.getvalue())


def _frames(ds: Dataset) -> Iterator[np.ndarray]:
    """Decoded Pixel Data, one frame at a time (bounded memory for a multi-frame 3D series)."""
    if "PixelData" not in ds:
        return iter(())
    return iter_pixels(ds)


def compare(old: bytes, new: bytes) -> tuple[bool, str]:
    """(True, "reencoded") when ``new`` is ``old`` in another encoding; else (False, reason). Never raises:
    a body pydicom cannot read or decode is "not known equivalent"."""
    try:
        before, after = dcmread(io.BytesIO(old), force=True), dcmread(io.BytesIO(new), force=True)
    except Exception:  # noqa: BLE001 - pydicom raises many types for damaged data
        return False, "unreadable"
    if not _transfer_syntax(before) or not _transfer_syntax(after):  # no file meta: not what the indexer stores
        return False, "unreadable"
    if _transfer_syntax(after) not in EXACT_CAPABLE:
        return False, "lossy"
    skip = ENCODING_ONLY | (COLOUR_LAYOUT if _colour(before) and _colour(after) else frozenset())
    try:
        if _elements(before, skip) != _elements(after, skip):
            return False, "elements"
    except Exception:  # noqa: BLE001 - an element pydicom cannot convert or write
        return False, "unreadable"
    if ("PixelData" in before) != ("PixelData" in after):
        return False, "pixels"
    try:
        for a, b in zip_longest(_frames(before), _frames(after)):
            if a is None or b is None or a.shape != b.shape or not np.array_equal(a, b):
                return False, "pixels"
    except Exception:  # noqa: BLE001 - decoder errors come in many types; their messages may quote values
        return False, "undecodable"
    return True, "reencoded"


def settle(store: Store, instance_ids: Iterable[int], *, actor: str = "indexer") -> list[Decision]:
    """Decide the new versions among ``instance_ids`` that are not decided yet (and any earlier undecided
    version of the same SOP Instance UID, oldest first, so a chain keeps its identity), record them and
    audit them in one transaction; the decisions made. A first version or one decided before costs one
    indexed query; never raises (a failure leaves the versions undecided: they run again, as before)."""
    ids = sorted(set(instance_ids))
    if not ids:
        return []
    try:
        rows = _undecided(store, ids)
        decisions = _decide(store, rows)
        return _record(store, decisions, actor)
    except Exception as exc:  # noqa: BLE001 - deciding is an optimisation: never fail the indexer with it
        log.warning("re-encoding check failed; the new versions count as changed",
                    extra={"count": len(ids), "error_type": type(exc).__name__})
        return []


def _undecided(store: Store, ids: list[int]) -> dict[str, list[_Row]]:
    """Every version of each SOP Instance UID with an undecided version among ``ids``, oldest first."""
    with store.db.session() as session:
        sops = set(session.exec(select(Instance.sop_uid_index).where(
            col(Instance.id).in_(ids), col(Instance.version) > 1, col(Instance.change_hash).is_(None))).all())
        if not sops:
            return {}
        found = session.exec(select(Instance.id, Instance.sop_uid_index, Instance.version, Instance.content_hash,
                                    Instance.change_hash, Instance.blob_id, Instance.transfer_syntax)
                             .where(col(Instance.sop_uid_index).in_(sops))
                             .order_by(col(Instance.sop_uid_index), col(Instance.version))).all()
    rows = [_Row(int(r[0]), r[1], int(r[2]), r[3], r[4], r[5], r[6]) for r in found]  # type: ignore[arg-type]
    return {sop: list(group) for sop, group in groupby(rows, key=lambda r: r.sop_uid_index)}


def _decide(store: Store, versions: dict[str, list[_Row]]) -> list[Decision]:
    decisions: list[Decision] = []
    for rows in versions.values():
        previous: _Row | None = None
        identity = ""
        for row in rows:
            if row.version > 1 and row.change_hash is None:
                decision = _decide_one(store, previous, row, identity)
                decisions.append(decision)
                identity = decision.change_hash
            else:
                identity = row.change_hash or row.content_hash
            previous = row
    return decisions


def _decide_one(store: Store, previous: _Row | None, row: _Row, identity: str) -> Decision:
    syntaxes = (previous.transfer_syntax if previous is not None else "", row.transfer_syntax)
    if previous is None or previous.version != row.version - 1:
        return Decision(row.id, None, row.version, row.content_hash, False, "no_previous", syntaxes)
    try:
        with store.db.session() as session:
            old, new = store.blobs.read(session, previous.blob_id), store.blobs.read(session, row.blob_id)
    except Exception:  # noqa: BLE001 - a purged or damaged body: not known to be the same
        same, reason = False, "unreadable"
    else:
        same, reason = compare(old, new)
    return Decision(row.id, previous.id, row.version, identity if same else row.content_hash, same, reason, syntaxes)


def _record(store: Store, decisions: list[Decision], actor: str) -> list[Decision]:
    """Each decision where the row is still undecided (another process may have decided it meanwhile)."""
    if not decisions:
        return []
    done: list[Decision] = []
    events: list[tuple[str, str, str, dict[str, Any]]] = []
    with store.db.session() as session:
        for d in decisions:
            result = session.execute(update(Instance).where(col(Instance.id) == d.instance_id,
                                                            col(Instance.change_hash).is_(None))
                                     .values(change_hash=d.change_hash))
            if not getattr(result, "rowcount", 0):
                continue
            done.append(d)
            events.append(("instance.reencoded" if d.equivalent else "instance.changed", actor,
                           f"instance:{d.instance_id}",
                           {"previous": d.previous_id, "version": d.version, "reason": d.reason,
                            "from_transfer_syntax": d.transfer_syntaxes[0],
                            "to_transfer_syntax": d.transfer_syntaxes[1]}))
        audit.append_many(session, events)
    for d in done:
        log.info("new version decided", extra={"instance_id": d.instance_id, "version": d.version,
                                               "reason": d.reason, "transfer_syntax": d.transfer_syntaxes[1]})
    return done
