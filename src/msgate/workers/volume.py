"""Assemble one series (decrypted datasets, in memory) into a :class:`~msgate.model.types.Volume`.

Geometry (PS3.3 C.7.6.2, "Image Plane"; the convention in ``model.types``): ``data[k, r, c]``, and
``affine_lps`` maps ``(c, r, k, 1)`` to LPS mm: column 0 = row direction x column spacing
(``PixelSpacing[1]``), column 1 = column direction x row spacing (``PixelSpacing[0]``), column 2 =
the mean step between slice origins, column 3 = the first slice's ``ImagePositionPatient``.

Handled: compressed pixel data (pydicom + pylibjpeg decoders); Enhanced / Legacy Converted MR
multi-frame (PS3.3 C.7.6.16 functional groups); slices sorted by position along the slice normal;
duplicate positions (the latest instance wins); NaN/Inf pixels (float exports; set to 0 and flagged);
mixed orientations (localisers: the largest stack
of one orientation and matrix size is kept); missing slices (linearly interpolated up to
:data:`MAX_MISSING_FRACTION`); gantry tilt (a sheared affine, the step keeps its true direction).
Anything else raises :class:`~msgate.errors.Rejected` with a reason that names no patient data.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from msgate.errors import Rejected
from msgate.model.types import Role, Volume

MIN_SLICES = 3
MAX_MISSING_FRACTION = 0.2
POSITION_TOLERANCE_MM = 0.01
TILT_TOLERANCE_DEG = 0.5


@dataclass
class Plane:
    """One 2D frame with its geometry, before stacking."""

    position: np.ndarray
    orientation: np.ndarray  # 6 direction cosines
    spacing: tuple[float, float]  # (row spacing, column spacing), PixelSpacing order
    pixels: np.ndarray
    order: tuple[int, int]  # (instance number, frame) for "latest wins" on duplicates
    source: int = 0  # index of the dataset it came from
    frame: int | None = None  # its 0-based frame in a multi-frame dataset (None: a single-frame dataset)


@dataclass(frozen=True)
class Assembly:
    volume: Volume
    flags: tuple[str, ...] = field(default_factory=tuple)
    sources: tuple[int | None, ...] = ()  # per slice k: the dataset index, None where interpolated
    frames: tuple[int | None, ...] = ()  # per slice k: the 0-based frame of a multi-frame dataset, else None


def _floats(value: Any, n: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise Rejected(f"{what} is not numeric", code="bad_geometry") from None
    if arr.shape != (n,):
        raise Rejected(f"{what} has {arr.size} values, expected {n}", code="bad_geometry")
    return arr


def _rescale(ds: Dataset, frames: np.ndarray, group: Dataset | None = None) -> np.ndarray:
    src: Any = group if group is not None and "PixelValueTransformationSequence" in group else ds
    if group is not None and "PixelValueTransformationSequence" in group:
        src = group.PixelValueTransformationSequence[0]
    slope = float(getattr(src, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(src, "RescaleIntercept", 0.0) or 0.0)
    out = frames.astype(np.float32)
    if slope != 1.0 or intercept != 0.0:
        out = out * np.float32(slope) + np.float32(intercept)
    return out


def _pixels(ds: Dataset, what: str) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise Rejected(f"{what} has no pixel data", code="no_pixels")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoder errors come in many types; the message may quote values
        raise Rejected(f"{what}: pixel data cannot be decoded ({type(exc).__name__}, transfer syntax "
                       f"{getattr(getattr(ds, 'file_meta', None), 'TransferSyntaxUID', '?')})",
                       code="undecodable_pixels") from None
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1:
        raise Rejected(f"{what}: colour images are not MR magnitude data", code="bad_pixels")
    return monochrome2(ds, np.asarray(arr))


def monochrome2(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """Stored values as MONOCHROME2 (higher = brighter). MONOCHROME1 (PS3.3 C.7.6.3.1.2: the minimum is
    displayed white) is inverted over the stored range, so a FLAIR lesion stays hyperintense."""
    if str(getattr(ds, "PhotometricInterpretation", "")).strip() != "MONOCHROME1":
        return stored
    bits = int(getattr(ds, "BitsStored", 0) or getattr(ds, "BitsAllocated", 16) or 16)
    if int(getattr(ds, "PixelRepresentation", 0) or 0):
        return (-1 - stored.astype(np.int64)).astype(np.float32)  # signed: [-2^(b-1), 2^(b-1)-1] onto itself
    return ((1 << bits) - 1 - stored.astype(np.int64)).astype(np.float32)


def _single_planes(ds: Dataset, what: str) -> list[Plane]:
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if keyword not in ds:
            raise Rejected(f"{what} has no {keyword}", code="bad_geometry")
    pixels = _rescale(ds, _pixels(ds, what))
    if pixels.ndim != 2:
        raise Rejected(f"{what}: expected one frame, got shape {pixels.shape}", code="bad_pixels")
    spacing = _floats(ds.PixelSpacing, 2, f"{what} PixelSpacing")
    return [Plane(_floats(ds.ImagePositionPatient, 3, f"{what} ImagePositionPatient"),
                  _floats(ds.ImageOrientationPatient, 6, f"{what} ImageOrientationPatient"),
                  (float(spacing[0]), float(spacing[1])), pixels, (int(getattr(ds, "InstanceNumber", 0) or 0), 0))]


def group_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """A functional group macro for ``frame``: per-frame first, then shared (PS3.3 C.7.6.16)."""
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > idx and sequence in seq[idx]:
            return seq[idx]
    return None


def _multiframe_planes(ds: Dataset, what: str) -> list[Plane]:
    frames = _pixels(ds, what)
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    frames = frames.reshape((n, *frames.shape[-2:]))
    planes = []
    for f in range(n):
        pos_g = group_item(ds, f, "PlanePositionSequence")
        ori_g = group_item(ds, f, "PlaneOrientationSequence")
        pix_g = group_item(ds, f, "PixelMeasuresSequence")
        if pos_g is None or ori_g is None or pix_g is None:
            raise Rejected(f"{what} frame {f + 1} lacks plane position, orientation or pixel measures",
                           code="bad_geometry")
        pos = _floats(pos_g.PlanePositionSequence[0].ImagePositionPatient, 3, f"{what} position")
        ori = _floats(ori_g.PlaneOrientationSequence[0].ImageOrientationPatient, 6, f"{what} orientation")
        sp = _floats(pix_g.PixelMeasuresSequence[0].PixelSpacing, 2, f"{what} PixelSpacing")
        rescale_g = group_item(ds, f, "PixelValueTransformationSequence")
        planes.append(Plane(pos, ori, (float(sp[0]), float(sp[1])), _rescale(ds, frames[f], rescale_g),
                            (int(getattr(ds, "InstanceNumber", 0) or 0), f), frame=f))
    return planes


def is_functional(ds: Dataset) -> bool:
    """Geometry in functional groups (Enhanced / Legacy Converted MR, PS3.3 C.7.6.16), whatever the
    frame count: a one-frame enhanced instance has no top-level Image Position either."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def planes_of(datasets: list[Dataset], role: str) -> list[Plane]:
    planes: list[Plane] = []
    for i, ds in enumerate(datasets):
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 or is_functional(ds):
            found = _multiframe_planes(ds, f"series {role} multi-frame instance {i + 1}")
        else:
            found = _single_planes(ds, f"series {role} instance {i + 1}")
        for plane in found:
            plane.source = i
        planes.extend(found)
    return planes


def _main_stack(planes: list[Plane], flags: list[str]) -> list[Plane]:
    """The largest group of one orientation and matrix size (drops localisers and odd frames)."""
    keys = [(tuple(np.round(p.orientation, 3)), p.pixels.shape, tuple(np.round(p.spacing, 4))) for p in planes]
    counts = Counter(keys)
    best, _ = counts.most_common(1)[0]
    if len(counts) > 1:
        flags.append("mixed_orientation")
    return [p for p, k in zip(planes, keys, strict=True) if k == best]


def assemble(datasets: list[Dataset], role: Role) -> Assembly:
    """One series' datasets -> a Volume; raises Rejected naming what makes the series unusable."""
    if not datasets:
        raise Rejected(f"series {role} has no instances", code="empty_series")
    flags: list[str] = []
    planes = _main_stack(planes_of(datasets, role), flags)
    row_dir, col_dir = planes[0].orientation[:3], planes[0].orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise Rejected(f"series {role}: ImageOrientationPatient is not orthonormal", code="bad_geometry")
    planes.sort(key=lambda p: (float(p.position @ normal), p.order))
    planes = _dedupe(planes, normal, flags)
    if len(planes) < MIN_SLICES:
        raise Rejected(f"series {role} has {len(planes)} usable slice(s); at least {MIN_SLICES} are needed",
                       code="too_few_slices")
    data, step, sources, frames = _stack(planes, normal, flags, role)
    if not np.isfinite(data).all():  # float exports (QSM) often hold NaN outside the brain: NaN in, NaN out
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
        flags.append("nonfinite_pixels")
    affine = np.eye(4)
    affine[:3, 0] = row_dir * planes[0].spacing[1]
    affine[:3, 1] = col_dir * planes[0].spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = planes[0].position
    tilt = np.degrees(np.arccos(np.clip(abs(step @ normal) / np.linalg.norm(step), -1.0, 1.0)))
    if tilt > TILT_TOLERANCE_DEG:
        flags.append("gantry_tilt")
    return Assembly(Volume(data=data, affine_lps=affine, role=role), tuple(flags), sources, frames)


def _dedupe(planes: list[Plane], normal: np.ndarray, flags: list[str]) -> list[Plane]:
    """Planes at the same position: keep the one with the highest (instance number, frame)."""
    kept: list[Plane] = []
    for plane in planes:
        if kept and abs(float((plane.position - kept[-1].position) @ normal)) < POSITION_TOLERANCE_MM:
            if "duplicate_positions" not in flags:
                flags.append("duplicate_positions")
            if plane.order >= kept[-1].order:
                kept[-1] = plane
            continue
        kept.append(plane)
    return kept


def _stack(planes: list[Plane], normal: np.ndarray, flags: list[str],
           role: str) -> tuple[np.ndarray, np.ndarray, tuple[int | None, ...], tuple[int | None, ...]]:
    """Stack along the normal; fill missing slices by linear interpolation (or reject too many gaps)."""
    dist = np.array([float(p.position @ normal) for p in planes])
    gaps = np.diff(dist)
    step_len = float(np.min(gaps))  # the true spacing, as long as two neighbours are present
    counts = np.maximum(1, np.rint(gaps / step_len).astype(int))
    # the whole gap must be a whole number of steps: a per-step tolerance let a 6.7-step gap through,
    # and the averaged step then mis-placed the real slices after it
    if np.any(np.abs(gaps - counts * step_len) > max(0.05 * step_len, POSITION_TOLERANCE_MM)):
        raise Rejected(f"series {role}: slice spacing is irregular and cannot be resampled on one grid",
                       code="irregular_spacing")
    missing = int(np.sum(counts - 1))
    total = len(planes) + missing
    if missing / total > MAX_MISSING_FRACTION:
        raise Rejected(f"series {role}: {missing} of {total} slices are missing", code="missing_slices")
    out = np.empty((total, *planes[0].pixels.shape), dtype=np.float32)
    sources: list[int | None] = [None] * total
    frames: list[int | None] = [None] * total
    k = 0
    for i, plane in enumerate(planes):
        out[k] = plane.pixels
        sources[k], frames[k] = plane.source, plane.frame
        if i < len(counts):
            for j in range(1, int(counts[i])):
                w = j / counts[i]
                out[k + j] = (1 - w) * plane.pixels + w * planes[i + 1].pixels
            k += int(counts[i])
    if missing:
        flags.append("missing_slices")
    step = (planes[-1].position - planes[0].position) / (total - 1)
    return out, step, tuple(sources), tuple(frames)
