"""Lesion Segmentation (PS3.3 A.51): binary, one segment per lesion class, empty frames omitted.

Segment classes: ``lesion`` (lesions without a paramagnetic rim, or not assessable) and ``rim``
(Rim+ lesions). Only classes with at least one voxel get a segment; segment numbers are consecutive
from 1, and :class:`SegResult` says which number each class and each lesion got, so the SR can
reference them. Frames follow the source planes (``mask[k]`` on :class:`FlairSources` slice ``k``):
single-frame sources are referenced image by image (slices the worker interpolated have no source and
no frame); an Enhanced MR multi-frame source is referenced frame by frame. A FLAIR the worker assembled
from several multi-frame instances cannot be one SEG's source (highdicom, like PS3.3 C.8.20.2, takes
one multi-frame image or single-frame images), so it gets no SEG and a log line saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pcodes

from msgate.model.types import ModelResult
from msgate.results import codes
from msgate.results.identity import Identity
from msgate.results.sources import FlairSources

log = logging.getLogger(__name__)

CLASSES = (
    ("lesion", "MS lesion", codes.LESION),
    ("rim", "Paramagnetic rim lesion", codes.RIM_LESION),
)


@dataclass
class SegResult:
    dataset: hd.seg.Segmentation
    class_segment: dict[str, int] = field(default_factory=dict)
    lesion_segment: dict[int, int] = field(default_factory=dict)
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


def class_masks(result: ModelResult) -> dict[str, np.ndarray]:
    """Boolean (k, r, c) masks per lesion class; labels missing from ``lesions`` count as ``lesion``."""
    rim_labels = [lesion.label for lesion in result.lesions if lesion.rim_positive]
    labels = np.asarray(result.lesion_mask)
    rim = np.isin(labels, rim_labels) if rim_labels else np.zeros(labels.shape, dtype=bool)
    return {"lesion": (labels > 0) & ~rim, "rim": rim}


def build_seg(result: ModelResult, sources: FlairSources | Sequence[Dataset], ident: Identity, *, series_uid: str,
              sop_uid: str, series_number: int = 9801) -> SegResult | None:
    """The SEG, or None when the mask is empty (a SEG needs at least one segment) or the sources are
    several multi-frame images."""
    src = check_grid(result, sources)
    masks = class_masks(result)
    present = [(key, label, concept) for key, label, concept in CLASSES if masks[key].any()]
    if not present:
        return None
    algorithm = hd.AlgorithmIdentificationSequence(name=ident.model_name, family=pcodes.cid7162.ArtificialIntelligence,
                                                   version=ident.model_version)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=codes.ABNORMAL_STRUCTURE,
            segmented_property_type=concept, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=hd.UID(), tracking_id=f"{key} segment",
        )
        for number, (key, label, concept) in enumerate(present, start=1)
    ]
    placed = on_sources(src, np.stack([masks[key] for key, _, _ in present], axis=-1).astype(np.uint8))
    if placed is None:
        log.warning("no SEG: the FLAIR planes used are not the frames of one image (several multi-frame "
                    "instances, or frames left out)", extra={"count": len(src.datasets)})
        return None
    source_images, pixels = placed
    seg = hd.seg.Segmentation(
        source_images=source_images, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=ident.manufacturer,
        manufacturer_model_name=ident.model_name, software_versions=ident.software_versions,
        device_serial_number=ident.device_serial_number, series_description="MS lesions (AI, unverified)",
        content_label="LESIONS", omit_empty_frames=True, coding_schemes=[codes.scheme_identification()],
    )
    out = SegResult(seg, {key: n for n, (key, _, _) in enumerate(present, start=1)})
    _lesion_frames(result, out, src)
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


def _lesion_frames(result: ModelResult, out: SegResult, src: FlairSources) -> None:
    """For each lesion: its segment number and the SEG frame numbers that contain it."""
    frames = frame_map(out.dataset)
    labels = np.asarray(result.lesion_mask)
    for lesion in result.lesions:
        number = out.class_segment.get("rim" if lesion.rim_positive else "lesion")
        if number is None:
            continue
        found = []
        for k in np.flatnonzero((labels == lesion.label).any(axis=(1, 2))):
            plane = src.slices[int(k)]
            key = None if plane is None else (number, plane.sop_uid, plane.frame_number)
            if key in frames:
                found.append(frames[key])  # type: ignore[index]
        if found:
            out.lesion_segment[lesion.label] = number
            out.lesion_frames[lesion.label] = sorted(found)
