"""Key rotation: re-wrap every data key (blob keys, the PHI field key and the CKKS secret key files'
keys) under the active KEK.

Blob bodies and PHI columns are never re-encrypted: only wrapped keys change. Work is done in
committed batches, so an interrupted rotation resumes where it stopped (``msgate keys rotate --resume``).
Once no data key is wrapped by an old KEK, ``msgate keys retire`` can drop it.

Purged blobs have no data key (crypto-shredding): they are neither re-wrapped nor counted, and a key a
purge made before that change left in its row is erased by the next rotation.
Rotation changes KEKs only: the PHI field key and the blind-index key stay the same (see docs/security.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import Session, col, func, select

from msgate.storage import audit, crypto
from msgate.storage.models import Blob, DataKey
from msgate.storage.store import Store

Progress = Callable[[int], None]


@dataclass
class RotationReport:
    rewrapped_blobs: int = 0
    rewrapped_keys: int = 0
    shredded: int = 0
    remaining: dict[str, int] = field(default_factory=dict)


def key_usage(session: Session, home: Path | None = None) -> dict[str, int]:
    """How many data keys (blobs + field keys, and with ``home`` the CKKS secret key files) each KEK wraps.
    Purged blobs are not counted: their keys are erased, and they must not keep an old KEK from retiring."""
    usage: dict[str, int] = {}
    queries = (select(Blob.kek_id, func.count()).where(col(Blob.purged_at).is_(None)).group_by(Blob.kek_id),
               select(DataKey.kek_id, func.count()).group_by(DataKey.kek_id))
    for query in queries:
        for kek_id, count in session.exec(query).all():  # type: ignore[call-overload]
            usage[kek_id] = usage.get(kek_id, 0) + count
    if home is not None:
        from msgate.model.he_keys import HeKeys

        for kek_id, count in HeKeys(home).kek_usage().items():
            usage[kek_id] = usage.get(kek_id, 0) + count
    return usage


def pending(session: Session, active_id: str) -> int:
    return sum(count for kek_id, count in key_usage(session).items() if kek_id != active_id)


def rewrap_blobs(store: Store, *, batch: int = 500, progress: Progress | None = None) -> int:
    done = 0
    while True:
        with store.db.session() as session:
            # locked: a purge committing between this read and the update would get its erased data key
            # written back (a purged body's backup copy decrypting again)
            blobs = session.exec(select(Blob).where(Blob.kek_id != store.ring.active_id, col(Blob.purged_at).is_(None))
                                 .limit(batch).with_for_update()).all()
            for blob in blobs:
                if blob.wrapped_dek:
                    store.blobs.rewrap(blob)
                    session.add(blob)
        done += len(blobs)
        if progress and blobs:
            progress(len(blobs))
        if len(blobs) < batch:
            return done


def rewrap_data_keys(store: Store) -> int:
    with store.db.session() as session:
        keys = session.exec(select(DataKey).where(DataKey.kek_id != store.ring.active_id)).all()
        for key in keys:
            plain = crypto.unwrap_key(store.ring, crypto.WrappedKey(key.kek_id, key.wrapped), blob_id=key.id,
                                      kind=key.purpose)
            wrapped = crypto.wrap_key(store.ring.active, plain, blob_id=key.id, kind=key.purpose)
            key.kek_id, key.wrapped = wrapped.kek_id, wrapped.wrapped
            session.add(key)
        return len(keys)


def rotate(store: Store, *, progress: Progress | None = None) -> RotationReport:
    """Re-wrap everything not yet under the active KEK (the new key must already be active)."""
    from msgate.model.he_keys import HeKeys

    report = RotationReport()
    with store.db.session() as session:
        report.shredded = store.blobs.shred_purged(session)
    report.rewrapped_keys = rewrap_data_keys(store) + HeKeys(store.settings.home, store.ring).rewrap()
    report.rewrapped_blobs = rewrap_blobs(store, progress=progress)
    with store.db.session() as session:
        report.remaining = {k: v for k, v in key_usage(session, store.settings.home).items()
                            if k != store.ring.active_id}
        audit.append(session, kind="key.rotate", actor=audit.operator(), subject=f"kek:{store.ring.active_id}",
                     detail={"rewrapped_blobs": report.rewrapped_blobs, "rewrapped_keys": report.rewrapped_keys,
                             "shredded_purged_keys": report.shredded})
    return report
