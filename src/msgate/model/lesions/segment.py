"""Lesion segmentation inference: FLAIR (+T1) -> label map in the FLAIR grid + LesionFinding list.

Sliding-window MONAI UNet on the preset's working grid, sigmoid > threshold, 26-connected
components (smaller than ``min_lesion_voxels`` dropped) mapped back to the FLAIR grid; each
component gets its volume (mL, from the FLAIR voxel size), its centroid in LPS mm (FLAIR affine)
and a location class (``location.py``). No disk, no network; deterministic in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
from numpy.typing import NDArray
from scipy import ndimage

from msgate.model.lesions.grid import WorkGrid, from_grid, normalise, to_grid, work_grid
from msgate.model.lesions.location import LocationNet, anatomy_maps, lesion_features
from msgate.model.lesions.presets import Preset
from msgate.model.types import LESION_LOCATIONS, LesionFinding, Volume

_CONN = np.ones((3, 3, 3), bool)


@dataclass(frozen=True)
class Lesions:
    """Output of :func:`segment`: label map ``[k, r, c]`` in the FLAIR grid (int16, 0 = background)."""

    label_map: NDArray[np.int16]
    findings: tuple[LesionFinding, ...]
    grid: WorkGrid
    work_labels: NDArray[np.int32]  # the same components on the working grid, (c, r, k)


def build_seg_net(preset: Preset) -> UNet:
    """2 input channels (normalised FLAIR, T1 or zeros), 1 output logit."""
    return UNet(spatial_dims=3, in_channels=2, out_channels=1, channels=preset.seg_channels,
                strides=preset.seg_strides, num_res_units=1)


def prepare(volumes: dict[str, Volume], preset: Preset) -> tuple[WorkGrid, dict[str, NDArray[np.float32]]]:
    """Working grid and normalised arrays (c, r, k) of every role present; FLAIR is required."""
    if "FLAIR" not in volumes:
        raise ValueError('Argument "volumes" must contain a "FLAIR" volume.')
    grid = work_grid(volumes["FLAIR"], preset.spacing_mm)
    arrays = {role: normalise(role, to_grid(vol, grid)) for role, vol in volumes.items()
              if role in ("FLAIR", "T1", "QSM")}
    return grid, arrays


def seg_input(arrays: dict[str, NDArray[np.float32]]) -> NDArray[np.float32]:
    """(2, c, r, k) network input: FLAIR and T1 (zeros when T1 is absent)."""
    t1 = arrays.get("T1")
    return np.stack([arrays["FLAIR"], t1 if t1 is not None else np.zeros_like(arrays["FLAIR"])])


@torch.no_grad()
def predict_prob(net: UNet, x: NDArray[np.float32], preset: Preset, device: str = "cpu") -> NDArray[np.float32]:
    """Sigmoid probability map on the working grid (sliding window, Gaussian blending)."""
    net.eval()
    inp = torch.from_numpy(x[None]).to(device)
    roi = (preset.seg_roi,) * 3
    out = sliding_window_inference(inp, roi, 4, net, overlap=0.25, mode="gaussian")
    return torch.sigmoid(torch.as_tensor(out)).cpu().numpy()[0, 0]


def components(mask: NDArray[np.bool_], min_voxels: int) -> tuple[NDArray[np.int32], int]:
    """26-connected components, relabelled 1..n after dropping those under ``min_voxels``."""
    lab, n = ndimage.label(mask, structure=_CONN)
    if n == 0:
        return lab.astype(np.int32), 0
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = np.flatnonzero(sizes >= min_voxels)
    keep = keep[keep > 0]
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    return lut[lab], int(keep.size)


def measure(label_map: NDArray[np.integer], affine_lps: NDArray[np.float64]) -> list[tuple[int, float, tuple[float, float, float]]]:
    """(label, volume mL, centroid LPS mm) of every label of a ``[k, r, c]`` map with its (c, r, k) affine."""
    vox_ml = abs(float(np.linalg.det(affine_lps[:3, :3]))) / 1000.0
    labels = np.unique(label_map)
    labels = labels[labels > 0]
    if labels.size == 0:
        return []
    counts = ndimage.sum_labels(np.ones(label_map.shape), label_map, index=labels)
    cents = ndimage.center_of_mass(np.ones(label_map.shape), label_map, index=labels)
    out = []
    for lab, cnt, (k, r, c) in zip(labels, counts, cents):
        p = affine_lps[:3, :3] @ np.array([c, r, k]) + affine_lps[:3, 3]
        out.append((int(lab), float(cnt) * vox_ml, (float(p[0]), float(p[1]), float(p[2]))))
    return out


def locate(work_labels: NDArray[np.int32], n: int, flair: NDArray[np.float32], grid: WorkGrid,
           loc_net: LocationNet) -> list[str]:
    """Location class of each working-grid component 1..n."""
    if n == 0:
        return []
    maps = anatomy_maps(flair, grid.affine)
    feats = np.stack([lesion_features(work_labels == i, flair, maps, grid.affine) for i in range(1, n + 1)])
    with torch.no_grad():
        dev = next(loc_net.parameters()).device
        idx = loc_net(torch.from_numpy(feats).to(dev)).argmax(1).cpu().numpy()
    return [LESION_LOCATIONS[int(i)] for i in idx]


def segment_arrays(net: UNet, loc_net: LocationNet, preset: Preset, grid: WorkGrid,
                   arrays: dict[str, NDArray[np.float32]], device: str = "cpu") -> Lesions:
    """:func:`segment` on already prepared arrays."""
    prob = predict_prob(net, seg_input(arrays), preset, device)
    work, n = components(prob > preset.threshold, preset.min_lesion_voxels)
    label_map = from_grid(work.astype(np.int16), grid).astype(np.int16)
    locs = dict(zip(range(1, n + 1), locate(work, n, arrays["FLAIR"], grid, loc_net)))
    findings = tuple(LesionFinding(lab, round(ml, 4), cen, locs.get(lab, "deep_wm"))
                     for lab, ml, cen in measure(label_map, grid.src_affine))
    return Lesions(label_map, findings, grid, work)
