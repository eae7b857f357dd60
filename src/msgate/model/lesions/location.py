"""Lesion location class from simple anatomy found on the FLAIR itself (no atlas, no registration).

Head mask = smoothed FLAIR above 30 % of its 95th percentile, holes filled; ventricles = dark
(CSF-like) voxels inside it, more than 10 mm deep, in large components. Per lesion, eight
features (distance to the ventricles and to the brain surface, position relative to the brain's
centre in LPS, brightness of the surrounding ring, which is higher next to cortex, size) feed a
small MLP trained on the synthetic ground truth (``LESION_LOCATIONS`` order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage
from torch import nn

from msgate.model.types import LESION_LOCATIONS

N_FEATURES = 8


@dataclass(frozen=True)
class AnatomyMaps:
    """Distance maps (mm) and brain frame on the working grid."""

    dvent: NDArray[np.float32]
    dout: NDArray[np.float32]
    centre_lps: NDArray[np.float64]
    extent_lps: NDArray[np.float64]


def anatomy_maps(flair: NDArray[np.float32], affine: NDArray[np.float64]) -> AnatomyMaps:
    """Ventricle and surface distance maps from a normalised FLAIR on the working grid."""
    sp = tuple(float(np.linalg.norm(affine[:3, i])) for i in range(3))
    sm = ndimage.gaussian_filter(flair, 1.0)
    tissue = sm > 0.3 * float(np.percentile(sm, 95))
    lab, n = ndimage.label(tissue)
    if n > 1:
        sizes = ndimage.sum_labels(tissue, lab, index=np.arange(1, n + 1))
        tissue = lab == (int(np.argmax(sizes)) + 1)
    head = ndimage.binary_fill_holes(tissue)
    dout = ndimage.distance_transform_edt(head, sampling=sp).astype(np.float32)
    vent = head & ~tissue & (dout > 10.0)
    lab, n = ndimage.label(vent)
    if n:
        sizes = ndimage.sum_labels(vent, lab, index=np.arange(1, n + 1))
        vent = np.isin(lab, np.flatnonzero(sizes >= max(0.1 * sizes.max(), 1.0)) + 1)
    dvent = (ndimage.distance_transform_edt(~vent, sampling=sp).astype(np.float32) if vent.any()
             else np.full(flair.shape, 50.0, np.float32))
    idx = np.argwhere(head)
    if idx.size == 0:
        idx = np.zeros((1, 3))
    lo, hi = idx.min(0), idx.max(0)
    corners = affine[:3, :3] @ np.stack([lo, hi], 1) + affine[:3, 3:4]
    return AnatomyMaps(dvent, dout, corners.mean(1), np.maximum(np.abs(corners[:, 1] - corners[:, 0]) / 2, 1.0))


def lesion_features(comp: NDArray[np.bool_], flair: NDArray[np.float32], maps: AnatomyMaps,
                    affine: NDArray[np.float64]) -> NDArray[np.float32]:
    """Eight location features of one component on the working grid (computed on its padded bounding box)."""
    idx = np.argwhere(comp)
    centre = affine[:3, :3] @ idx.mean(0) + affine[:3, 3]
    rel = (centre - maps.centre_lps) / maps.extent_lps
    box = tuple(slice(max(int(a) - 3, 0), int(b) + 4) for a, b in zip(idx.min(0), idx.max(0)))
    c = comp[box]
    ring = ndimage.binary_dilation(c, iterations=2) & ~c
    ring_val = float(flair[box][ring].mean()) if ring.any() else 0.0
    vox_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    dvent = maps.dvent[box][c]
    return np.array([
        float(dvent.min()) / 10.0, float(dvent.mean()) / 10.0,
        float(maps.dout[box][c].min()) / 10.0, rel[0] * np.sign(rel[0]), rel[1], rel[2], ring_val,
        float(np.log(c.sum() * vox_ml * 1000.0 + 1.0)) / 5.0,
    ], dtype=np.float32)


class LocationNet(nn.Module):
    """8 features -> 4 location logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, len(LESION_LOCATIONS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def fit_location(x: NDArray[np.float32], y: NDArray[np.int64], epochs: int, seed: int) -> LocationNet:
    """Full-batch Adam on the features of ground-truth lesions (class-balanced weights)."""
    torch.manual_seed(seed)
    net = LocationNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    counts = np.bincount(y, minlength=len(LESION_LOCATIONS)).astype(np.float32) + 1.0
    loss_fn = nn.CrossEntropyLoss(weight=torch.from_numpy(counts.sum() / counts / len(counts)))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_fn(net(xt), yt)
        loss.backward()
        opt.step()
    return net.eval()
