"""Lesion-centred 3D patches on the working grid."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def crop(arr: NDArray[np.float32], centre: NDArray[np.float64], size: int) -> NDArray[np.float32]:
    """``size``^3 patch of ``arr`` around the voxel ``centre`` (rounded), zero-padded at the borders."""
    c = np.rint(np.asarray(centre)).astype(np.intp)
    lo = c - size // 2
    out = np.zeros((size, size, size), np.float32)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(lo + size, arr.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    out[dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = \
        arr[src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
    return out


def lesion_patches(qsm: NDArray[np.float32] | None, flair: NDArray[np.float32],
                   centres: list[NDArray[np.float64]], size: int) -> NDArray[np.float32]:
    """(N, 2, s, s, s): channel 0 QSM (zeros when absent), channel 1 FLAIR."""
    out = np.zeros((len(centres), 2, size, size, size), np.float32)
    for i, c in enumerate(centres):
        if qsm is not None:
            out[i, 0] = crop(qsm, c, size)
        out[i, 1] = crop(flair, c, size)
    return out
