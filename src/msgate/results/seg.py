"""Lesion Segmentation (PS3.3 A.51): binary, one segment per lesion, empty frames omitted.

Each finding of ``result.lesions`` with a voxel on a source plane gets its own segment ``Lesion <label>``
(category Abnormal structure; type Lesion, or Paramagnetic rim lesion when Rim+), so the SR's TID 1411
group for that lesion references exactly the voxels it measures (PS3.16 TID 1411: the referenced
segment is the region measured). Segment label, tracking id and tracking UID equal the SR group's.
Voxels whose label no finding describes go into one last ``MS lesion, other`` segment that no group
references. Segment numbers are consecutive from 1 (:class:`SegResult` says which lesion got which);
the pixels go to highdicom as one label map with segment numbers as values (non-overlapping BINARY
segments), so memory follows the volume, not the number of lesions.

Frames follow the source planes (``mask[k]`` on :class:`FlairSources` slice ``k``): single-frame
sources are referenced image by image (slices the worker interpolated have no source and no frame, so
a lesion's voxels there are in no segment); an Enhanced MR multi-frame source is referenced frame
by frame. A FLAIR the worker assembled from several multi-frame instances cannot be one SEG's source
(highdicom, like PS3.3 C.8.20.2, takes one multi-frame image or single-frame images), so it gets no
SEG and a log line saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pcodes

from msgate.model.types import LesionFinding, ModelResult
from msgate.results import codes
from msgate.results.identity import Identity
from msgate.results.sources import FlairSources

log = logging.getLogger(__name__)

OTHER_LABEL = "MS lesion, other"


def series_description(replaces: str | None = None) -> str:
    """The SEG's Series Description (LO, at most 64 characters); a correction names the result it
    replaces by that result's series date and time (:func:`msgate.results.publish.replaced_at`)."""
    if replaces is None:
        return "MS lesions (AI, unverified)"
    return f"MS lesions (AI, unverified, replaces {replaces})"


@dataclass
class SegResult:
    """The SEG and, by lesion label, its segment number, tracking UID and SEG frame numbers."""

    dataset: hd.seg.Segmentation
    lesion_segment: dict[int, int] = field(default_factory=dict)
    lesion_tracking_uid: dict[int, str] = field(default_factory=dict)
    lesion_frames: dict[int, list[int]] = field(default_factory=dict)


def check_grid(result: ModelResult, sources: FlairSources | Sequence[Dataset]) -> FlairSources:
    """The sources as :class:`FlairSources`, once the result is known to be on their grid."""
    src = FlairSources.of(sources)
    shape = src.shape()
    if tuple(result.lesion_mask.shape) != shape:
        raise ValueError(f'Argument "result": lesion_mask shape {result.lesion_mask.shape} is not the FLAIR grid {shape}')
    if result.heatmap is not None and tuple(result.heatmap.shape) != shape:
        raise ValueError(f'Argument "result": heatmap shape {result.heatmap.shape} is not the FLAIR grid {shape}')
    return src


def on_sources(src: FlairSources, planes: np.ndarray) -> tuple[list[Dataset], np.ndarray] | None:
    """``planes`` (one per slice ``k``) re-ordered as frames of the derived object's source images:
    the single-frame images with a source, or every frame of the one multi-frame image. None when the sources are several multi-frame images, or one whose
    frames the worker did not all use (highdicom refuses a source with repeated positions or mixed
    orientations), so the derived object is left out rather than wrong."""
    if src.one_plane_per_image:
        keep = src.present
        return [src.slices[k].dataset for k in keep], planes[keep]  # type: ignore[union-attr]
    if len(src.datasets) != 1:
        return None
    ds = src.first
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    frames = [src.slices[k].frame for k in src.present]  # type: ignore[union-attr]
    if None in frames or sorted(frames) != list(range(n)):  # type: ignore[type-var]
        return None  # frames the worker left out (a duplicate position, a localiser): one SEG cannot skip them
    out = np.zeros((n, *planes.shape[1:]), dtype=planes.dtype)
    for k, frame in zip(src.present, frames, strict=True):
        out[frame] = planes[k]  # type: ignore[index]
    return [ds], out


def number_segments(result: ModelResult, planes: np.ndarray) -> tuple[np.ndarray, list[LesionFinding | None]]:
    """Segment numbers for ``planes`` (lesion labels on the SEG's frames), as a label map (uint8, or
    uint16 past 255 segments) and the lesion each number describes: 1.. for the findings of
    ``result.lesions`` with a voxel on those frames, in list order, then one remainder segment (None)
    for labels > 0 that no finding describes. Built plane by plane, so memory stays near the volume's."""
    values = np.unique(planes)
    present = {int(v) for v in values if v > 0}
    described: list[LesionFinding | None] = []
    number: dict[int, int] = {}
    for lesion in result.lesions:
        if lesion.label in present and lesion.label not in number:
            described.append(lesion)
            number[lesion.label] = len(described)
    if present - number.keys():
        described.append(None)
    dtype = np.uint8 if len(described) <= np.iinfo(np.uint8).max else np.uint16
    lut = np.array([0 if v <= 0 else number.get(int(v), len(described)) for v in values], dtype=dtype)
    out = np.zeros(planes.shape, dtype=dtype)
    for i, plane in enumerate(planes):
        out[i] = lut[np.searchsorted(values, plane)]
    return out, described


def _description(number: int, lesion: LesionFinding | None,
                 algorithm: hd.AlgorithmIdentificationSequence) -> hd.seg.SegmentDescription:
    """Segment ``Lesion <label>`` (tracking id the same, as the SR's TID 1411 group), or the remainder."""
    label = OTHER_LABEL if lesion is None else f"Lesion {lesion.label}"
    concept = codes.RIM_LESION if lesion is not None and lesion.rim_positive else codes.LESION
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label, segmented_property_category=codes.ABNORMAL_STRUCTURE,
        segmented_property_type=concept, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_uid=hd.UID(), tracking_id=label,
    )


def build_seg(result: ModelResult, sources: FlairSources | Sequence[Dataset], ident: Identity, *, series_uid: str,
              sop_uid: str, series_number: int = 9801, replaces: str | None = None) -> SegResult | None:
    """The SEG, or None when the mask is empty on the source planes (a SEG needs at least one segment)
    or the sources are several multi-frame images. ``replaces``: see :func:`series_description`."""
    src = check_grid(result, sources)
    labels = np.asarray(result.lesion_mask)
    if not (labels > 0).any():
        return None
    placed = on_sources(src, labels)
    if placed is None:
        log.warning("no SEG: the FLAIR planes used are not the frames of one image (several multi-frame "
                    "instances, or frames left out)", extra={"count": len(src.datasets)})
        return None
    source_images, planes = placed
    pixels, described = number_segments(result, planes)
    if not described:
        log.warning("no SEG: no lesion voxel lies on a source plane (interpolated slices only)")
        return None
    algorithm = hd.AlgorithmIdentificationSequence(name=ident.model_name, family=pcodes.cid7162.ArtificialIntelligence,
                                                   version=ident.model_version)
    descriptions = [_description(n, lesion, algorithm) for n, lesion in enumerate(described, start=1)]
    seg = hd.seg.Segmentation(
        source_images=source_images, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=ident.manufacturer,
        manufacturer_model_name=ident.model_name, software_versions=ident.software_versions,
        device_serial_number=ident.device_serial_number, series_description=series_description(replaces),
        content_label="LESIONS", omit_empty_frames=True, coding_schemes=[codes.scheme_identification()],
    )
    out = SegResult(seg)
    for description, lesion in zip(descriptions, described, strict=True):
        if lesion is not None:
            out.lesion_segment[lesion.label] = int(description.SegmentNumber)
            out.lesion_tracking_uid[lesion.label] = str(description.TrackingUID)
    _lesion_frames(out)
    return out


def frame_map(seg: Dataset) -> dict[tuple[int, str, int | None], int]:
    """(segment number, source SOP Instance UID, source frame number or None) -> 1-based SEG frame number,
    read from the dataset."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    out: dict[tuple[int, str, int | None], int] = {}
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        ident = frame.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        number = source.get("ReferencedFrameNumber")
        out[(int(ident[0].ReferencedSegmentNumber), str(source.ReferencedSOPInstanceUID),
             None if number is None else int(number))] = n
    return out


def _lesion_frames(out: SegResult) -> None:
    """For each lesion with a segment: the SEG frame numbers of that segment."""
    frames: dict[int, list[int]] = {}
    for (number, _uid, _frame), n in frame_map(out.dataset).items():
        frames.setdefault(number, []).append(n)
    for label, number in out.lesion_segment.items():
        out.lesion_frames[label] = sorted(frames.get(number, []))
