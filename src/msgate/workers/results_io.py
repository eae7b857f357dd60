"""Store and read a job's result: one encrypted ``result`` blob per job, upserted by job id.

The payload format is the results side's (``msgate.results.payload``: npz + JSON, no pickle). A task
that runs twice replaces the blob of the one ``result`` row (the old body is deleted), so a job
never has two results.
"""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from msgate.model.types import ModelResult
from msgate.results.payload import dump_result, load_result
from msgate.storage.models import Blob, Result, utcnow
from msgate.storage.store import Store


def store_result(store: Store, *, job_id: str, result: ModelResult) -> str:
    """Encrypt and upsert; returns the blob id."""
    payload = dump_result(result)
    for _attempt in range(3):
        with store.db.session() as session:
            blob = store.blobs.put(session, kind="result", source=payload)
            try:
                session.flush()
                row = session.exec(select(Result).where(Result.job_id == job_id).with_for_update()).first()
                old_blob = None
                if row is None:
                    session.add(Result(job_id=job_id, blob_id=blob.id))
                else:
                    old_blob, row.blob_id, row.created_at = row.blob_id, blob.id, utcnow()
                    session.add(row)
                session.flush()
                if old_blob is not None:
                    old = session.get(Blob, old_blob)
                    if old is not None:
                        store.blobs.bodies.delete(session, old_blob)
                        session.delete(old)
                return blob.id
            except IntegrityError:
                session.rollback()
                store.blobs.discard_body(session, blob.id)
            except BaseException:
                session.rollback()
                store.blobs.discard_body(session, blob.id)
                raise
    raise RuntimeError("could not upsert the result row")


def read_result(store: Store, job_id: str) -> ModelResult | None:
    """The decrypted result of a job, or None when it has none."""
    with store.db.session() as session:
        row = session.exec(select(Result).where(Result.job_id == job_id)).first()
        if row is None:
            return None
        return load_result(store.blobs.read(session, row.blob_id))
