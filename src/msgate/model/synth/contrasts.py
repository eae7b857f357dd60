"""MR contrasts (FLAIR, T1, QSM) and acquisition effects.

Tissue signal (relative units, WM FLAIR 0.35):
  FLAIR = 0.08 CSF + 0.55 GM + 0.35 WM - 0.5 chi_deep; lesions 0.7-1.0, lacunes 0.12.
  T1    = 0.15 CSF + 0.55 GM + 0.85 WM; lesions 0.55-0.75, black holes 0.2-0.35.
  QSM   = ppm: -0.02 WM, +0.01 GM, 0 CSF, deep nuclei +0.015..0.12; MS lesion
          core mostly near-isointense to white matter (-0.02..-0.005), 15 %
          diffusely paramagnetic (0..+0.02); Rim+ rim band +0.03..0.06 and veins
          (``lesions.py``, ``veins.py``).
Acquisition: 3D isotropic at the grid resolution, or 2D axial with 3-5 mm slices
(Gaussian slice profile, FWHM = thickness); multiplicative bias field (exp of a
smooth field, SD ~0.1); Rician noise (magnitude images); QSM is simulated as a
reconstruction (dipole forward model, field noise, background residue,
misregistration, TKD inversion: ``qsm.py``); vendor-like integer scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from msgate.model.synth.anatomy import Anatomy, smooth_field
from msgate.model.synth.lesions import LesionMaps
from msgate.model.synth.qsm import reconstruct

F32 = NDArray[np.float32]
ROLES: tuple[str, ...] = ("FLAIR", "T1", "QSM")
DIFFUSE_PARAMAGNETIC_P = 0.15  # MS lesions with a diffusely paramagnetic core (about 11 % at 3 T, AJR 2021)
QSM_NOISE_1MM = 0.3  # QSM noise SD at 1 mm^3 in ppm per unit of ``Acquisition.noise`` (0.02-0.06 -> 0.006-0.018)


def _lesion_values(maps: LesionMaps, rng: np.random.Generator, qrng: np.random.Generator) -> dict[str, F32]:
    """Per-lesion-id target intensities for each contrast (index 0 unused)."""
    n = len(maps.lesions) + 1
    vals = {r: np.zeros(n, np.float32) for r in ROLES}
    for les in maps.lesions:
        if les.kind == "lacune":
            f, t, q = 0.12, float(rng.uniform(0.15, 0.22)), 0.0
        elif les.kind == "ovoid":
            f = float(rng.uniform(0.8, 1.0))
            t = float(rng.uniform(0.2, 0.35) if les.black_hole else rng.uniform(0.55, 0.7))
            u = float(rng.uniform(0.0, 1.0))  # the main-stream draw of the QSM core, as before
            q = 0.02 * u if qrng.random() < DIFFUSE_PARAMAGNETIC_P else -0.02 + 0.015 * u
        else:
            f, t, q = float(rng.uniform(0.7, 0.9)), float(rng.uniform(0.6, 0.75)), float(rng.uniform(-0.005, 0.005))
        vals["FLAIR"][les.id], vals["T1"][les.id], vals["QSM"][les.id] = f, t, q
    return vals


def tissue_images(an: Anatomy, maps: LesionMaps, rng: np.random.Generator) -> dict[str, F32]:
    """Noise-free FLAIR, T1 (relative units) and QSM (ppm) on the subject grid."""
    base = {
        "FLAIR": 0.08 * an.csf + 0.55 * an.gm + 0.35 * an.wm - 0.5 * an.deep_chi,
        "T1": 0.15 * an.csf + 0.55 * an.gm + 0.85 * an.wm,
        "QSM": -0.02 * an.wm + 0.01 * an.gm + an.deep_chi,
    }
    vals = _lesion_values(maps, rng, rng.spawn(1)[0])
    out: dict[str, F32] = {}
    nz = maps.labels > 0
    for role, img in base.items():
        img = img.astype(np.float32)
        f = maps.frac[nz]
        img[nz] = img[nz] * (1.0 - f) + f * vals[role][maps.labels[nz]]
        out[role] = img
    out["QSM"] += maps.rim_ppm
    if maps.vein_ppm is not None:
        out["QSM"] += maps.vein_ppm
    return out


def thick_slices(vol: F32, spacing: float, thickness: float) -> tuple[F32, float]:
    """Resample along z to contiguous 2D slices; returns (volume, z offset of slice 0 in mm)."""
    step = thickness / spacing
    sm = ndimage.gaussian_filter1d(vol, sigma=step / 2.355, axis=2, mode="nearest")
    first = (step - 1.0) / 2.0
    pos = np.arange(first, vol.shape[2] - 1, step)
    k0 = np.floor(pos).astype(np.intp)
    w = (pos - k0).astype(np.float32)
    out = sm[:, :, k0] * (1.0 - w) + sm[:, :, np.minimum(k0 + 1, vol.shape[2] - 1)] * w
    return np.ascontiguousarray(out, dtype=np.float32), float(first * spacing)


def bias_field(shape: tuple[int, int, int], rng: np.random.Generator, strength: float = 0.12) -> F32:
    """Smooth multiplicative receive-coil bias, exp(N(0, strength)) at the control points."""
    coeffs = rng.normal(0.0, strength, size=(3, 3, 3)).astype(np.float32)
    return np.exp(smooth_field(shape, coeffs, width=0.45)).astype(np.float32)


def rician(img: F32, sigma: float, rng: np.random.Generator) -> F32:
    """Magnitude of the signal plus complex Gaussian noise."""
    re = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    im = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    return np.sqrt(re * re + im * im)


@dataclass(frozen=True)
class Acquisition:
    """How one series is acquired: 2D/3D, slice thickness, noise, vendor scaling."""

    role: str
    mode: str  # "2D" or "3D"
    thickness: float  # mm
    noise: float  # relative to WM FLAIR signal
    scale: float  # stored value per relative unit (magnitude) or per ppm (QSM: 1/slope)


@dataclass
class Series:
    """Integer pixel data on an axis-aligned RAS grid plus its rescale."""

    acq: Acquisition
    pixels: NDArray[np.int16] | NDArray[np.uint16]
    affine: NDArray[np.float64]
    slope: float
    intercept: float


def acquire(img: F32, acq: Acquisition, affine: NDArray[np.float64], rng: np.random.Generator,
            an: Anatomy | None = None) -> Series:
    """Apply slice profile, bias, noise and integer scaling to a noise-free image.

    QSM: ``img`` is the susceptibility map; the anatomy's brain mask and distance to the brain surface
    shape the reconstruction (without ``an``: the whole field of view, smooth background only).
    """
    sp = float(affine[0, 0])
    aff = affine.copy()
    if acq.mode == "2D" and acq.thickness > sp * 1.01:
        img, z0 = thick_slices(img, sp, acq.thickness)
        aff[2, 2], aff[2, 3] = acq.thickness, affine[2, 3] + z0
    if acq.role == "QSM":
        white = rng.standard_normal(img.shape, dtype=np.float32)  # the main-stream draw, as before
        noisy = reconstruct(img, white, None if an is None else an.brain, None if an is None else an.dout, sp,
                            acq.noise * QSM_NOISE_1MM, rng.spawn(1)[0])
        pix = np.clip(np.rint(noisy * acq.scale), -32768, 32767).astype(np.int16)
        return Series(acq, pix, aff, 1.0 / acq.scale, 0.0)
    shp = (int(img.shape[0]), int(img.shape[1]), int(img.shape[2]))
    noisy = rician(img * bias_field(shp, rng), acq.noise * 0.35, rng)
    pix = np.clip(np.rint(noisy * acq.scale), 0, 4095).astype(np.uint16)
    return Series(acq, pix, aff, 1.0, 0.0)
