"""QSM as a reconstruction, not as ground truth plus white noise.

Real QSM is the solution of an ill-posed field-to-source inversion, so its errors are structured:

* **dipole forward model and TKD inversion** (threshold 0.15-0.25): susceptibility is turned into a
  local field with the unit dipole kernel ``D(k) = 1/3 - kz^2/|k|^2`` (B0 along z), then inverted by
  truncated k-space division. Near the magic-angle cone the inversion underestimates and streaks
  (around veins and iron-rich nuclei) and colours the noise (Wang et al., IEEE TBME 2013; Zhou et al.,
  arXiv 1701.05457).
* **field noise** chosen so that the reconstructed QSM has a white-equivalent noise SD of
  ``noise_1mm`` ppm for a 1 mm^3 voxel (about 0.006-0.018 ppm), scaled by voxel volume^-1/2.
* **background-field residue** of imperfect background removal, added to the map: smooth shading of
  a few ppb plus a stronger component within about 6 mm of the brain surface.
* **residual QSM-FLAIR misregistration**: a random 0.3-1.0 mm sub-voxel shift (phase ramp in k-space).

Outside the brain mask the map is zero, as scanner and pipeline outputs are masked.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.fft as sfft
from numpy.typing import NDArray

from msgate.model.synth.anatomy import smooth_field

F32 = NDArray[np.float32]
MARGIN = 4  # voxels of zero padding (at least) against wrap-around of streaks; sizes rounded up to fast FFT lengths


@lru_cache(maxsize=4)
def _fft_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    a, b, c = (sfft.next_fast_len(int(n) + 2 * MARGIN, real=True) for n in shape)
    return a, b, c


def _freqs(n: int, spacing: float, half: bool = False) -> NDArray[np.float32]:
    return (np.fft.rfftfreq(n, spacing) if half else np.fft.fftfreq(n, spacing)).astype(np.float32)


@lru_cache(maxsize=4)
def dipole_kernel(shape: tuple[int, int, int], spacing: float) -> F32:
    """Unit dipole kernel on the ``rfftn`` half-spectrum (0 at k = 0); cached per grid (read-only)."""
    kx = _freqs(shape[0], spacing)[:, None, None]
    ky = _freqs(shape[1], spacing)[None, :, None]
    kz = _freqs(shape[2], spacing, half=True)[None, None, :]
    k2 = kx * kx + ky * ky + kz * kz
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.float32(1.0 / 3.0) - kz * kz / k2
    d[0, 0, 0] = 0.0
    d = np.asarray(d, np.float32)
    d.flags.writeable = False
    return d


def tkd_inverse(d: F32, threshold: float) -> F32:
    """Truncated k-space division: 1/D, with |D| clipped at ``threshold`` (0 at k = 0)."""
    t = np.float32(threshold)
    inv = np.float32(1.0) / np.where(d < 0, np.minimum(d, -t), np.maximum(d, t))
    inv[0, 0, 0] = 0.0
    return inv


def background_residue(dout: F32, rng: np.random.Generator) -> F32:
    """Residual of imperfect background-field removal, as it shows in QSM (ppm): smooth shading of a few
    ppb plus a stronger component within about 6 mm of the brain surface (``dout``: distance to it, mm)."""
    shp = (int(dout.shape[0]), int(dout.shape[1]), int(dout.shape[2]))
    smooth = smooth_field(shp, rng.normal(0.0, 0.008, (3, 3, 3)).astype(np.float32), width=0.4)
    edge = smooth_field(shp, rng.normal(0.0, 0.015, (5, 5, 5)).astype(np.float32), width=0.25)
    return (smooth + edge * np.exp(-dout / np.float32(6.0))).astype(np.float32)


def _shift_ramps(shape: tuple[int, int, int], shift: NDArray[np.float64]) -> list[NDArray[np.complex64]]:
    """Per-axis phase ramps of a sub-voxel shift (voxels), broadcastable over the half-spectrum."""
    out = []
    for ax, (n, s) in enumerate(zip(shape, shift)):
        f = _freqs(n, 1.0, half=ax == 2)
        r = np.exp(-2j * np.pi * f * s).astype(np.complex64)
        out.append(r.reshape([-1 if a == ax else 1 for a in range(3)]))
    return out


def reconstruct(chi: F32, white: F32, brain: NDArray[np.bool_] | None, dout: F32 | None, spacing: float,
                noise_1mm: float, rng: np.random.Generator) -> F32:
    """Simulated QSM (ppm) of a susceptibility map ``chi``; ``white`` is a standard-normal field of its shape.

    ``brain`` masks the result and ``dout`` (mm to the brain surface) shapes the background residue; without
    them the whole field of view is brain and the residue is only the smooth shading.
    """
    n0, n1, n2 = (int(n) for n in chi.shape)
    shp = _fft_shape((n0, n1, n2))
    d = dipole_kernel(shp, spacing)
    inv = tkd_inverse(d, float(rng.uniform(0.15, 0.25)))
    gain = float(np.sqrt(np.mean(inv[1:] ** 2)))  # noise gain of the inversion
    lo = [MARGIN] * 3
    pad = [(a, s - n - a) for a, s, n in zip(lo, shp, (n0, n1, n2))]
    shift = rng.normal(0.0, 1.0, 3)
    shift *= rng.uniform(0.3, 1.0) / np.linalg.norm(shift) / spacing  # voxels
    spec = sfft.rfftn(np.pad(chi, pad), workers=1)
    mean = spec[0, 0, 0]
    spec *= inv * d
    for ramp in _shift_ramps(shp, shift):
        spec *= ramp
    spec += sfft.rfftn(np.pad(white * np.float32(noise_1mm / spacing**1.5 / gain), pad), workers=1) * inv
    spec[0, 0, 0] = mean  # the inversion cannot see the mean; keep it
    out = sfft.irfftn(spec, s=shp, workers=1)[lo[0]:lo[0] + n0, lo[1]:lo[1] + n1, lo[2]:lo[2] + n2]
    dist = dout if dout is not None else np.full(chi.shape, 1e3, np.float32)
    out = out + background_residue(dist, rng)
    return out if brain is None else np.where(brain, out, 0.0).astype(np.float32)


def line_profile(shape: tuple[int, int, int], spacing: float, p0: NDArray[np.float64], p1: NDArray[np.float64],
                 radius_mm: float) -> tuple[tuple[slice, ...], F32] | None:
    """Partial-volume fraction of a vessel segment p0-p1 (voxel coordinates) of ``radius_mm`` on its bounding box.

    The vessel's cross-section (pi r^2) is spread with a Gaussian of SD half a voxel (and at least r), so a
    thin vein fills a fraction of a voxel, as it does at 1-2 mm.
    """
    sig = max(0.5 * spacing, radius_mm)
    reach = int(np.ceil(3.0 * sig / spacing))
    lo = np.maximum(np.floor(np.minimum(p0, p1)).astype(int) - reach, 0)
    hi = np.minimum(np.ceil(np.maximum(p0, p1)).astype(int) + reach + 1, np.asarray(shape))
    if np.any(hi <= lo):
        return None
    g = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi)], indexing="ij"), -1)
    seg = p1 - p0
    t = np.clip(((g - p0) @ seg) / max(float(seg @ seg), 1e-9), 0.0, 1.0)
    dist = np.linalg.norm(g - (p0 + t[..., None] * seg), axis=-1) * spacing
    frac = np.pi * radius_mm**2 / (2.0 * np.pi * sig**2) * np.exp(-0.5 * (dist / sig) ** 2)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), np.minimum(frac, 1.0).astype(np.float32)
