"""Working grid: resample the contract's volumes (``data[k, r, c]``, ``affine_lps`` on ``(c, r, k)``).

Arrays inside the lesion model are in ``(c, r, k)`` order so that index order and affine columns
agree. The working grid keeps the FLAIR orientation and field of view at the preset's isotropic
spacing; everything else (QSM, T1, which may come from another acquisition) is resampled into it
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


def work_grid(flair: Volume, spacing_mm: float) -> WorkGrid:
    """FLAIR field of view at ``spacing_mm``; voxel centres aligned on the FLAIR corner."""
    src_shape = tuple(int(n) for n in flair.data.shape[::-1])
    sp = np.asarray(flair.spacing)
    ratio = spacing_mm / sp
    shape = tuple(max(1, int(round(n / r))) for n, r in zip(src_shape, ratio))
    scale = np.diag(np.append(ratio, 1.0))
    scale[:3, 3] = (ratio - 1.0) / 2.0
    aff = np.asarray(flair.affine_lps, dtype=np.float64) @ scale
    return WorkGrid(shape, aff, src_shape, np.asarray(flair.affine_lps, dtype=np.float64))  # type: ignore[arg-type]


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
    ones = Volume(np.ones(vol.data.shape, np.float32), vol.affine_lps, vol.role)
    return to_grid(ones, grid, order=0) > 0.5


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
