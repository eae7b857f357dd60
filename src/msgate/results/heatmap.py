"""Heatmaps: a Parametric Map of the Grad-CAM volume (PS3.3 A.75) and RGB Secondary Capture key images.

The Parametric Map keeps the float values (0..1, UCUM "1") frame by frame on the source FLAIR grid.
The key images are for PACS viewers that show neither SEG nor Parametric Maps: FLAIR in grey, the
heatmap blended in colour, lesion outlines burned in (yellow; red for Rim+) and a "NOT FOR DIAGNOSIS"
banner. They are upscaled (nearest neighbour) to at least 512 columns so the banner is legible; the
Pixel Spacing is scaled to match. Burned In Annotation is YES and the image type DERIVED/SECONDARY.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from msgate.model.types import ModelResult
from msgate.results import codes
from msgate.results.identity import Identity, copy_patient_study
from msgate.results.seg import check_grid, on_sources
from msgate.results.sources import FlairSources, SourceSlice

BANNER = "NOT FOR DIAGNOSIS - unverified AI output"
MIN_COLUMNS = 512


def pm_description(replaces: str | None = None) -> str:
    """The map's Series Description (LO, at most 64 characters); a correction names the result it replaces
    (:func:`msgate.results.seg.series_description`)."""
    if replaces is None:
        return "MS AI saliency map (unverified)"
    return f"MS AI saliency map (unverified, replaces {replaces})"


def key_images_description(replaces: str | None = None) -> str:
    """The key images' Series Description; in a correction "unverified" gives way to the time replaced (the
    64 characters of LO), "not for diagnosis" stays (the burned-in banner says both)."""
    if replaces is None:
        return "MS AI key images (unverified, not for diagnosis)"
    return f"MS AI key images (not for diagnosis, replaces {replaces})"


def build_pm(result: ModelResult, sources: FlairSources | Sequence[Dataset], ident: Identity, *, series_uid: str,
             sop_uid: str, series_number: int = 9802,
             replaces: str | None = None) -> hd.pm.ParametricMap | None:
    """The map on the source planes (as the SEG: see :func:`msgate.results.seg.on_sources`), or None
    without a heatmap or over several multi-frame sources. ``replaces``: see :func:`pm_description`."""
    if result.heatmap is None:
        return None
    placed = on_sources(check_grid(result, sources), np.clip(result.heatmap, 0.0, 1.0).astype(np.float32))
    if placed is None:
        return None
    source_images, pixels = placed
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="GRADCAM", lut_explanation=codes.SALIENCY.meaning, unit=codes.UNIT_ONE,
        value_range=(0.0, 1.0), slope=1.0, intercept=0.0,
    )
    pm = hd.pm.ParametricMap(
        source_images=source_images, pixel_array=pixels,
        series_instance_uid=series_uid, series_number=series_number, sop_instance_uid=sop_uid, instance_number=1,
        manufacturer=ident.manufacturer, manufacturer_model_name=ident.model_name,
        software_versions=ident.software_versions, device_serial_number=ident.device_serial_number,
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        content_label="GRADCAM", content_description="Grad-CAM saliency (AI, unverified)",
        series_description=pm_description(replaces),
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0,
                                                         window_explanation="saliency 0..1")],
    )
    pm.Laterality = None  # Type 2C; the brain is not a paired structure: present, empty
    return pm


def key_slices(result: ModelResult, count: int, among: Sequence[int] | None = None) -> list[int]:
    """The ``count`` slices (of ``among``, default all) with the most heatmap mass plus lesion voxels,
    in slice order."""
    score = (np.asarray(result.lesion_mask) > 0).sum(axis=(1, 2)).astype(float)
    if result.heatmap is not None:
        score = score + np.asarray(result.heatmap, dtype=float).sum(axis=(1, 2))
    if among is not None:
        allowed = np.zeros(score.shape, dtype=bool)
        allowed[list(among)] = True
        score[~allowed] = 0.0
    ranked = [int(k) for k in np.argsort(-score, kind="stable") if score[k] > 0][:count]
    return sorted(ranked)


def _grey(pixels: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(pixels, (1, 99.5))
    return np.clip((pixels - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _colour(value: np.ndarray) -> np.ndarray:
    """A small 'jet'-like map: blue -> cyan -> yellow -> red."""
    v = np.clip(value, 0.0, 1.0)[..., None]
    stops = np.array([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=float)
    pos = v * (len(stops) - 1)
    i = np.clip(np.floor(pos).astype(int), 0, len(stops) - 2)
    t = pos - i
    return stops[i[..., 0]] * (1 - t) + stops[i[..., 0] + 1] * t


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def render_key_image(flair: np.ndarray, heat: np.ndarray | None, labels: np.ndarray, rim_labels: Sequence[int],
                     scale: int) -> np.ndarray:
    """One RGB uint8 image (rows*scale, cols*scale, 3)."""
    from PIL import Image, ImageDraw, ImageFont

    up = np.ones((scale, scale))
    grey = np.kron(_grey(flair.astype(float)), up)[..., None].repeat(3, axis=-1)
    rgb = grey
    if heat is not None:
        # Only the upper half of the saliency, and only inside the head, is tinted, so the FLAIR stays
        # readable; the parametric map carries the full heatmap.
        flair_f = flair.astype(float)
        head = np.kron((flair_f > 0.1 * np.percentile(flair_f, 99)).astype(float), up)
        h = np.kron(np.clip(heat, 0, 1), up)
        alpha = (0.5 * np.clip((h - 0.5) * 2.0, 0, 1) * head)[..., None]
        rgb = rgb * (1 - alpha) + _colour(h) * alpha
    big = np.kron(labels, np.ones((scale, scale), dtype=labels.dtype))
    lesion, rim = _outline(big > 0), _outline(np.isin(big, list(rim_labels)))
    rgb[lesion] = (1.0, 1.0, 0.0)
    rgb[rim] = (1.0, 0.0, 0.0)
    image = Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    size = max(12, image.width // 32)
    font = ImageFont.load_default(size=size)
    draw.rectangle((0, 0, image.width, size + 8), fill=(160, 0, 0))
    draw.text((6, 4), BANNER, fill=(255, 255, 255), font=font)
    return np.asarray(image)


def build_key_images(result: ModelResult, sources: FlairSources | Sequence[Dataset], ident: Identity, *,
                     series_uid: str, sop_uids: Sequence[str], series_number: int = 9803,
                     replaces: str | None = None) -> list[hd.sc.SCImage]:
    """Key images on the chosen slices that have a source image (an interpolated slice has none).
    ``replaces``: see :func:`key_images_description`."""
    src = check_grid(result, sources)
    labels = np.asarray(result.lesion_mask)
    picked = key_slices(result, len(sop_uids), among=src.present)
    rim_labels = [lesion.label for lesion in result.lesions if lesion.rim_positive]
    out = []
    for n, (k, sop_uid) in enumerate(zip(picked, sop_uids, strict=False), start=1):
        plane = src.slices[k]
        assert plane is not None
        ref = plane.dataset
        scale = max(1, -(-MIN_COLUMNS // int(ref.Columns)))
        heat = None if result.heatmap is None else np.asarray(result.heatmap[k])
        pixels = render_key_image(plane.pixels(), heat, labels[k], rim_labels, scale)
        spacing = [float(v) / scale for v in plane.spacing]
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref, pixel_array=pixels, photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8, coordinate_system=hd.CoordinateSystemNames.PATIENT, series_instance_uid=series_uid,
            series_number=series_number, sop_instance_uid=sop_uid, instance_number=n, manufacturer=ident.manufacturer,
            pixel_spacing=(spacing[0], spacing[1]), patient_orientation=_orientation(plane),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        copy_patient_study(sc, ref)
        sc.SeriesDescription = key_images_description(replaces)
        sc.BurnedInAnnotation = "YES"
        sc.Laterality = None  # Type 2C, present and empty (unpaired structure)
        sc.ImageComments = BANNER
        sc.DerivationDescription = f"FLAIR with {codes.SALIENCY.meaning} and lesion outlines, {ident.model_name} {ident.model_version}"
        sc.SourceImageSequence = [plane.reference()]
        out.append(sc)
    return out


def _orientation(plane: SourceSlice) -> tuple[str, str]:
    """Patient Orientation (row direction, column direction) from the image orientation, main axis only."""
    iop = np.asarray(plane.orientation, dtype=float)
    letters = (("L", "R"), ("P", "A"), ("H", "F"))

    def one(v: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(v)))
        return letters[axis][0] if v[axis] > 0 else letters[axis][1]

    return one(iop[:3]), one(iop[3:])
