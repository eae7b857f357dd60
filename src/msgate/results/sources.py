"""The source FLAIR images of a job, decrypted in memory, one per slice ``k`` of the model's grid.

The worker records which stored instance (and, for an Enhanced MR multi-frame instance, which frame)
each slice ``k`` of the assembled FLAIR volume came from (``Job.flags``: ``flair_instances`` and
``flair_frames``; None where it interpolated a missing slice). The SEG, the parametric map and the
key images are rendered on exactly those source frames, so ``mask[k]`` lands on the image it was
computed from even when the worker dropped a localiser, kept the latest of two instances at one
position, or filled a gap.

Jobs recorded before the frame mapping existed fall back to :func:`sort_slices` over the series'
current single-frame instances (the geometry convention of :mod:`msgate.model.types`: instances
sorted by their position along the slice normal, ascending). Pixel data is kept (the key images
need it).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlmodel import Session, col, select

from msgate.errors import Rejected
from msgate.storage.models import Instance, Job, Series
from msgate.storage.store import Store
from msgate.workers.volume import group_item, is_functional, monochrome2

FLAIR_ROLE = "FLAIR"


@dataclass(frozen=True)
class SourceSlice:
    """One source image plane: a single-frame dataset, or one frame of a multi-frame dataset."""

    dataset: Dataset
    frame: int | None = None  # 0-based frame of a multi-frame dataset

    @property
    def sop_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def frame_number(self) -> int | None:
        """The 1-based frame number DICOM references use (None: a single-frame image)."""
        return None if self.frame is None else self.frame + 1

    def _value(self, sequence: str, keyword: str) -> Any:
        if self.frame is not None:
            item = group_item(self.dataset, self.frame, sequence)
            if item is not None:
                return getattr(item[sequence][0], keyword)
        return getattr(self.dataset, keyword)

    @property
    def orientation(self) -> list[float]:
        return [float(v) for v in self._value("PlaneOrientationSequence", "ImageOrientationPatient")]

    @property
    def position(self) -> list[float]:
        return [float(v) for v in self._value("PlanePositionSequence", "ImagePositionPatient")]

    @property
    def spacing(self) -> list[float]:
        return [float(v) for v in self._value("PixelMeasuresSequence", "PixelSpacing")]

    def pixels(self) -> np.ndarray:
        """This plane's pixel values (2D), higher = brighter (a MONOCHROME1 image inverted)."""
        arr = monochrome2(self.dataset, np.asarray(self.dataset.pixel_array))
        return arr if self.frame is None else arr.reshape((-1, *arr.shape[-2:]))[self.frame]

    def reference(self) -> Dataset:
        """An image reference item (SOP class, SOP instance, and the frame of a multi-frame image)."""
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = self.dataset.SOPClassUID, self.sop_uid
        if self.frame_number is not None:
            item.ReferencedFrameNumber = self.frame_number
        return item


@dataclass(frozen=True)
class FlairSources:
    """Per slice ``k`` of the result grid, its source plane (None: interpolated, no source image)."""

    slices: tuple[SourceSlice | None, ...]

    @classmethod
    def of(cls, sources: FlairSources | Sequence[Dataset]) -> FlairSources:
        """As given, or one slice per (already sorted) single-frame dataset."""
        if isinstance(sources, FlairSources):
            return sources
        return cls(tuple(SourceSlice(ds) for ds in sources))

    def __post_init__(self) -> None:
        if not any(s is not None for s in self.slices):
            raise Rejected("the result has no FLAIR source image", code="no_flair")

    @property
    def present(self) -> list[int]:
        """The slices ``k`` that have a source image."""
        return [k for k, s in enumerate(self.slices) if s is not None]

    @property
    def datasets(self) -> list[Dataset]:
        """Each source dataset once, in slice order."""
        out: dict[int, Dataset] = {}
        for s in self.slices:
            if s is not None:
                out.setdefault(id(s.dataset), s.dataset)
        return list(out.values())

    @property
    def first(self) -> Dataset:
        return self.datasets[0]

    @property
    def one_plane_per_image(self) -> bool:
        """Every source image gives one plane (single-frame images, or one-frame enhanced instances)."""
        planes = [s for s in self.slices if s is not None]
        return len({id(s.dataset) for s in planes}) == len(planes) and all(
            int(getattr(s.dataset, "NumberOfFrames", 1) or 1) == 1 for s in planes)

    def shape(self) -> tuple[int, int, int]:
        return len(self.slices), int(self.first.Rows), int(self.first.Columns)


def slice_position(ds: Dataset) -> float:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)))


def sort_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Sort single-frame images along the slice normal (the model's ``k`` axis)."""
    return sorted(datasets, key=slice_position)


def flair_series_id(session: Session, study_id: int) -> int:
    rows = session.exec(select(Series).where(Series.study_id == study_id, Series.role == FLAIR_ROLE)
                        .order_by(col(Series.frame_count).desc(), col(Series.instance_count).desc(),
                                  col(Series.id))).all()
    if not rows or rows[0].id is None:
        raise Rejected("the study has no FLAIR series", code="no_flair")
    return rows[0].id


def load_sources(store: Store, job: Job) -> FlairSources:
    """The job's source FLAIR planes, per slice ``k``, from the worker's record (or the legacy order)."""
    flags = job.flags or {}
    instances, frames = flags.get("flair_instances"), flags.get("flair_frames")
    if not instances:
        return FlairSources.of(load_flair(store, study_id=job.study_id))
    frames = frames if frames and len(frames) == len(instances) else [None] * len(instances)
    wanted = {int(i) for i in instances if i is not None}
    datasets: dict[int, Dataset] = {}
    with store.db.session() as session:
        for instance in session.exec(select(Instance).where(col(Instance.id).in_(wanted))).all():
            assert instance.id is not None
            datasets[instance.id] = dcmread(io.BytesIO(store.blobs.read(session, instance.blob_id)))
    if set(datasets) != wanted:
        raise Rejected("a FLAIR instance the result was computed from is no longer stored", code="no_flair")
    if not flags.get("flair_frames") and any(is_functional(ds) or int(getattr(ds, "NumberOfFrames", 1) or 1) > 1
                                             for ds in datasets.values()):
        raise Rejected("the job was computed before source frames were recorded, on a multi-frame FLAIR: "
                       "re-run it (msgate jobs retry) to publish it", code="no_frame_map")
    return FlairSources(tuple(None if i is None else SourceSlice(datasets[int(i)], None if f is None else int(f))
                              for i, f in zip(instances, frames, strict=True)))


def load_flair(store: Store, *, study_id: int) -> list[Dataset]:
    """Decrypt and parse the current instances of the study's FLAIR series, sorted (single-frame)."""
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
