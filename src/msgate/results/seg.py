"""Lesion Segmentation (PS3.3 A.51): binary, one segment per lesion class, empty frames omitted.

Segment classes: ``lesion`` (lesions without a paramagnetic rim, or not assessable) and ``rim``
(Rim+ lesions). Only classes with at least one voxel get a segment; segment numbers are consecutive
from 1, and :class:`SegResult` says which number each class and each lesion got, so the SR can
reference them. Frames follow the source images one to one (``mask[k]`` on sorted source ``k``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pcodes

from msgate.model.types import ModelResult
from msgate.results import codes
from msgate.results.identity import Identity

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


def check_grid(result: ModelResult, sources: Sequence[Dataset]) -> None:
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if tuple(result.lesion_mask.shape) != shape:
        raise ValueError(f'Argument "result": lesion_mask shape {result.lesion_mask.shape} is not the FLAIR grid {shape}')
    if result.heatmap is not None and tuple(result.heatmap.shape) != shape:
        raise ValueError(f'Argument "result": heatmap shape {result.heatmap.shape} is not the FLAIR grid {shape}')


def class_masks(result: ModelResult) -> dict[str, np.ndarray]:
    """Boolean (k, r, c) masks per lesion class; labels missing from ``lesions`` count as ``lesion``."""
    rim_labels = [lesion.label for lesion in result.lesions if lesion.rim_positive]
    labels = np.asarray(result.lesion_mask)
    rim = np.isin(labels, rim_labels) if rim_labels else np.zeros(labels.shape, dtype=bool)
    return {"lesion": (labels > 0) & ~rim, "rim": rim}


def build_seg(result: ModelResult, sources: Sequence[Dataset], ident: Identity, *, series_uid: str,
              sop_uid: str, series_number: int = 9801) -> SegResult | None:
    """The SEG, or None when the mask is empty (a SEG needs at least one segment)."""
    check_grid(result, sources)
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
    pixels = np.stack([masks[key] for key, _, _ in present], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=list(sources), pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=ident.manufacturer,
        manufacturer_model_name=ident.model_name, software_versions=ident.software_versions,
        device_serial_number=ident.device_serial_number, series_description="MS lesions (AI, unverified)",
        content_label="LESIONS", omit_empty_frames=True, coding_schemes=[codes.scheme_identification()],
    )
    out = SegResult(seg, {key: n for n, (key, _, _) in enumerate(present, start=1)})
    _lesion_frames(result, out, sources)
    return out


def frame_map(seg: Dataset) -> dict[tuple[int, str], int]:
    """(segment number, source SOP Instance UID) -> 1-based frame number, read from the dataset."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    out: dict[tuple[int, str], int] = {}
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        ident = frame.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        out[(int(ident[0].ReferencedSegmentNumber), str(source))] = n
    return out


def _lesion_frames(result: ModelResult, out: SegResult, sources: Sequence[Dataset]) -> None:
    """For each lesion: its segment number and the SEG frame numbers that contain it."""
    frames = frame_map(out.dataset)
    labels = np.asarray(result.lesion_mask)
    for lesion in result.lesions:
        number = out.class_segment.get("rim" if lesion.rim_positive else "lesion")
        slices = np.flatnonzero((labels == lesion.label).any(axis=(1, 2)))
        found = [frames[(number, str(sources[int(k)].SOPInstanceUID))] for k in slices
                 if number is not None and (number, str(sources[int(k)].SOPInstanceUID)) in frames]
        if number is not None and found:
            out.lesion_segment[lesion.label] = number
            out.lesion_frames[lesion.label] = sorted(found)
