"""The source FLAIR series of a job, decrypted in memory, in the model's slice order.

:func:`sort_slices` is the geometry convention of :mod:`msgate.model.types`: instances sorted by
their position along the slice normal (row direction x column direction), ascending, so
``mask[k]`` belongs to ``sort_slices(...)[k]``. Pixel data is kept (the key images need it).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlmodel import Session, col, select

from msgate.errors import Rejected
from msgate.storage.models import Instance, Series
from msgate.storage.store import Store

FLAIR_ROLE = "FLAIR"


def slice_position(ds: Dataset) -> float:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)))


def sort_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Sort single-frame images along the slice normal (the model's ``k`` axis)."""
    return sorted(datasets, key=slice_position)


def flair_series_id(session: Session, study_id: int) -> int:
    rows = session.exec(select(Series).where(Series.study_id == study_id, Series.role == FLAIR_ROLE)
                        .order_by(col(Series.instance_count).desc(), col(Series.id))).all()
    if not rows or rows[0].id is None:
        raise Rejected("the study has no FLAIR series", code="no_flair")
    return rows[0].id


def load_flair(store: Store, *, study_id: int) -> list[Dataset]:
    """Decrypt and parse the current instances of the study's FLAIR series, sorted."""
    datasets = []
    with store.db.session() as session:
        series_id = flair_series_id(session, study_id)
        instances = session.exec(select(Instance).where(Instance.series_id == series_id,
                                                        col(Instance.current).is_(True))).all()
        for instance in instances:
            datasets.append(dcmread(io.BytesIO(store.blobs.read(session, instance.blob_id))))
    if not datasets:
        raise Rejected("the FLAIR series has no instances", code="no_flair")
    return sort_slices(datasets)
