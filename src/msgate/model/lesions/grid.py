"""Working grid: resample the contract's volumes (``data[k, r, c]``, ``affine_lps`` on ``(c, r, k)``).

Arrays inside the lesion model are in ``(c, r, k)`` order so that index order and affine columns
agree. The working grid covers the FLAIR field of view at the preset's isotropic spacing, in the
orientation the networks were trained in (:func:`work_grid`); everything else (QSM, T1, which may come from another acquisition) is resampled into it
through the affines, and results go back to the FLAIR grid the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from msgate.model.types import Volume

F32 = NDArray[np.float32]


@dataclass(frozen=True)
class WorkGrid:
    """The working grid (``shape``/``affine`` in (c, r, k)) and the FLAIR grid it came from."""

    shape: tuple[int, int, int]
    affine: NDArray[np.float64]
    src_shape: tuple[int, int, int]
    src_affine: NDArray[np.float64]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(np.linalg.norm(self.affine[:3, i])) for i in range(3))  # type: ignore[return-value]


CANONICAL = np.diag([-1.0, -1.0, 1.0])
"""Direction cosines (columns: c, r, k) of the orientation the networks were trained in: axial slices
stored with ImageOrientationPatient ``[-1,0,0,0,-1,0]`` (``synth.protocols``), slices along +z (LPS)."""


def work_grid(flair: Volume, spacing_mm: float) -> WorkGrid:
    """The FLAIR field of view at ``spacing_mm``, in the training orientation (:data:`CANONICAL`).

    A FLAIR stored that way keeps its own grid (voxel centres aligned on its corner). Any other storage
    (axial ``[1,0,0,0,1,0]``, sagittal or coronal 3D, oblique) gets the axis-aligned grid over the same
    field of view: the lesion network and the Rim+ patches (B0 along ``k``) see the head as in training,
    so the results no longer depend on how the scanner stored the slices."""
    src_shape = tuple(int(n) for n in flair.data.shape[::-1])
    src_aff = np.asarray(flair.affine_lps, dtype=np.float64)
    sp = np.asarray(flair.spacing)
    ratio = spacing_mm / sp
    directions = src_aff[:3, :3] / sp
    if np.allclose(directions, CANONICAL, atol=1e-3):
        shape = tuple(max(1, int(round(n / r))) for n, r in zip(src_shape, ratio))
        scale = np.diag(np.append(ratio, 1.0))
        scale[:3, 3] = (ratio - 1.0) / 2.0
        return WorkGrid(shape, src_aff @ scale, src_shape, src_aff)  # type: ignore[arg-type]
    edges = np.array([[i, j, m, 1.0] for i in (-0.5, src_shape[0] - 0.5) for j in (-0.5, src_shape[1] - 0.5)
                      for m in (-0.5, src_shape[2] - 0.5)])
    world = (src_aff @ edges.T)[:3].T
    lo, hi = world.min(axis=0), world.max(axis=0)
    shape = tuple(max(1, int(round(float(e) / spacing_mm))) for e in hi - lo)
    aff = np.eye(4)
    aff[:3, :3] = CANONICAL * spacing_mm
    aff[:3, 3] = [hi[0] - spacing_mm / 2, hi[1] - spacing_mm / 2, lo[2] + spacing_mm / 2]  # corner voxel centres
    return WorkGrid(shape, aff, src_shape, src_aff)  # type: ignore[arg-type]


def _resample(arr: NDArray[np.generic], src_aff: NDArray[np.float64], dst_aff: NDArray[np.float64],
              out_shape: tuple[int, ...], order: int) -> NDArray[np.generic]:
    m = np.linalg.inv(src_aff) @ dst_aff
    if arr.shape == tuple(out_shape) and np.allclose(m, np.eye(4), atol=1e-4):
        return arr.copy()
    return ndimage.affine_transform(arr, m[:3, :3], m[:3, 3], output_shape=out_shape, order=order,
                                    mode="constant", cval=0.0)


def to_grid(vol: Volume, grid: WorkGrid, order: int = 1) -> F32:
    """``vol`` resampled into the working grid, (c, r, k), float32."""
    arr = np.ascontiguousarray(vol.data.transpose(2, 1, 0), dtype=np.float32)
    return _resample(arr, np.asarray(vol.affine_lps, np.float64), grid.affine, grid.shape, order).astype(np.float32)


def coverage(vol: Volume, grid: WorkGrid) -> NDArray[np.bool_]:
    """Where ``vol`` has data on the working grid (c, r, k): a QSM slab covers less than the FLAIR, and
    :func:`to_grid` fills the rest with 0, which reads as 'no rim' rather than 'not measured'."""
    # ones padded with a zero voxel all round, resampled linearly: >= 0.5 exactly within half a voxel of
    # the outer slice centres, which is what the volume covers (order 0 dropped the outer half slices)
    ones = np.pad(np.ones(vol.data.shape[::-1], np.float32), 1)
    shift = np.eye(4)
    shift[:3, 3] = -1.0
    padded = _resample(ones, np.asarray(vol.affine_lps, np.float64) @ shift, grid.affine, grid.shape, order=1)
    return np.asarray(padded >= 0.5 - 1e-6)


def covered(cov: NDArray[np.bool_], box: tuple[slice, ...] | None, margin: int = 2) -> bool:
    """Is the bounding box ``box`` (grid slices), grown by ``margin`` voxels (within the grid), all in ``cov``?"""
    if box is None:
        return False
    grown = tuple(slice(max(0, b.start - margin), min(n, b.stop + margin)) for b, n in zip(box, cov.shape))
    return bool(cov[grown].all())


def from_grid(arr: NDArray[np.generic], grid: WorkGrid) -> NDArray[np.generic]:
    """A working-grid label map back in the FLAIR grid, ``[k, r, c]`` (nearest neighbour)."""
    out = _resample(arr, grid.affine, grid.src_affine, grid.src_shape, order=0)
    return np.ascontiguousarray(out.transpose(2, 1, 0))


def normalise(role: str, arr: F32) -> F32:
    """FLAIR/T1: divide by the median of the head foreground; QSM: ppm x 20 (physical units kept)."""
    if role == "QSM":
        return np.clip(arr * 20.0, -4.0, 4.0).astype(np.float32)
    top = float(np.percentile(arr[::2, ::2, ::2], 99.0))
    if top <= 0:
        return np.zeros_like(arr)
    fg = arr > 0.1 * top
    med = float(np.median(arr[fg])) if fg.any() else top
    return np.clip(arr / max(med, 1e-6), 0.0, 4.0).astype(np.float32)
