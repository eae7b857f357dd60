"""MONAI preprocessing: native volumes -> one fixed RAS model grid, and heatmaps back to FLAIR.

``Volume.data[k, r, c]`` with ``affine_lps`` over ``(c, r, k)`` becomes a channel-first MetaTensor
``[1, c, r, k]`` with a RAS affine (``diag(-1, -1, 1) @ affine_lps``). Every modality is resampled
(``SpatialResample``, world coordinates) onto a grid of ``preset.grid`` voxels at ``preset.spacing_mm``,
centred on the FLAIR field of view, so the channels are co-registered by their DICOM geometry.
Magnitude images are scaled to [0, 1] by robust percentiles; QSM (ppm) is multiplied by 10 and
clipped to [-1, 1]; the lesion map becomes a lesion fraction (binary mask, bilinear).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import GaussianSmooth, ScaleIntensityRangePercentiles, SpatialResample
from numpy.typing import NDArray

from msgate.model.patient.presets import Preset
from msgate.model.types import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
CHANNELS: tuple[str, ...] = ("FLAIR", "QSM", "T1", "LESION")


@dataclass(frozen=True)
class ModelInput:
    """One case on the model grid: image channels, modality presence and the grid affine (RAS)."""

    image: NDArray[np.float32]  # [len(CHANNELS), *grid]
    present: NDArray[np.float32]  # [2]: QSM present, T1 present
    affine_ras: NDArray[np.float64]


def to_meta(data_krc: NDArray[np.floating], affine_lps: NDArray[np.float64]) -> MetaTensor:
    """A [1, c, r, k] MetaTensor with RAS affine from contract-ordered data."""
    arr = np.ascontiguousarray(np.asarray(data_krc, np.float32).transpose(2, 1, 0))[None]
    return MetaTensor(torch.from_numpy(arr), affine=torch.as_tensor(LPS_TO_RAS @ affine_lps, dtype=torch.float64))


def model_grid_affine(flair: Volume, preset: Preset) -> NDArray[np.float64]:
    """RAS affine of the model grid, axis-aligned, centred on the FLAIR volume's centre."""
    aff = LPS_TO_RAS @ flair.affine_lps
    k, r, c = flair.data.shape
    centre = aff @ np.array([(c - 1) / 2, (r - 1) / 2, (k - 1) / 2, 1.0])
    out = np.diag([preset.spacing_mm] * 3 + [1.0])
    out[:3, 3] = centre[:3] - preset.spacing_mm * (np.asarray(preset.grid) - 1) / 2
    return out


def _resample(img: MetaTensor, dst: NDArray[np.float64], size: tuple[int, int, int], mode: str) -> NDArray[np.float32]:
    out = SpatialResample(mode=mode, padding_mode="zeros", dtype=np.float32)(
        img, dst_affine=torch.as_tensor(dst), spatial_size=size)
    return np.asarray(out[0].detach().cpu().numpy() if hasattr(out, "detach") else out[0], np.float32)


def _antialias(img: MetaTensor, native_mm: tuple[float, ...], target_mm: float) -> MetaTensor:
    sigma = [max(0.0, 0.4 * (target_mm / s - 1.0)) for s in native_mm]
    if max(sigma) < 0.3:
        return img
    return GaussianSmooth(sigma=sigma)(img)  # type: ignore[return-value]


def _magnitude(vol: Volume) -> MetaTensor:
    img = to_meta(vol.data, vol.affine_lps)
    return ScaleIntensityRangePercentiles(lower=1.0, upper=99.5, b_min=0.0, b_max=1.0, clip=True)(img)  # type: ignore[return-value]


def prepare(volumes: dict[str, Volume], lesion_mask: NDArray[np.integer], preset: Preset) -> ModelInput:
    """Resample FLAIR, QSM, T1 (when present) and the lesion map onto the model grid."""
    flair = volumes["FLAIR"]
    dst = model_grid_affine(flair, preset)
    size = preset.grid
    chans = np.zeros((len(CHANNELS), *size), np.float32)
    present = np.zeros(2, np.float32)
    for ci, role in enumerate(CHANNELS[:3]):
        vol = volumes.get(role)
        if vol is None:
            continue
        if role == "QSM":
            img = to_meta(np.clip(vol.data * 10.0, -1.0, 1.0), vol.affine_lps)
        else:
            img = _magnitude(vol)
        img = _antialias(img, vol.spacing, preset.spacing_mm)
        chans[ci] = _resample(img, dst, size, "bilinear")
        if role != "FLAIR":
            present[ci - 1] = 1.0
    les = to_meta((np.asarray(lesion_mask) > 0).astype(np.float32), flair.affine_lps)
    les = _antialias(les, flair.spacing, preset.spacing_mm)
    chans[3] = np.clip(_resample(les, dst, size, "bilinear") * 2.0, 0.0, 1.0)
    return ModelInput(chans, present, dst)


def to_flair_grid(map_ijk: NDArray[np.float32], affine_ras: NDArray[np.float64], flair: Volume) -> NDArray[np.float32]:
    """Resample a model-grid map back onto the FLAIR grid, returned as [k, r, c] in [0, 1]."""
    img = MetaTensor(torch.from_numpy(np.ascontiguousarray(map_ijk, np.float32))[None],
                     affine=torch.as_tensor(affine_ras, dtype=torch.float64))
    k, r, c = flair.data.shape
    out = _resample(img, LPS_TO_RAS @ flair.affine_lps, (c, r, k), "bilinear")
    return np.ascontiguousarray(np.clip(out.transpose(2, 1, 0), 0.0, 1.0), np.float32)
