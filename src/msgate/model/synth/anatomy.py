"""Subject anatomy from the MNI ICBM152 2009a template shipped inside nilearn.

Only the offline loaders (``load_mni152_*_template``) are used, never ``fetch_*``.
The template is turned once per process into a stack of uint8 channels
(GM, WM, brain, deep-grey susceptibility, distance to the ventricles, distance
to the brain surface, infratentorial flag). Each subject is a nearest-neighbour
gather of that stack through one smooth warp: head rotation, global scaling and
a random Gaussian-RBF deformation, built separably so it costs a few matmuls.
Atrophy is applied afterwards from the warped distance channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

F32 = NDArray[np.float32]

# Channel order of the template stack.
GM, WM, BRAIN, DEEP_CHI, DVENT, DOUT, INFRA = range(7)
_DIST_SCALE = 2.0  # distance channels store mm * 2 (0.5 mm steps, clipped at 127 mm)

# Deep grey nuclei in MNI mm: centre (x>0 side), semi-axes, susceptibility (ppm).
_NUCLEI: tuple[tuple[tuple[float, float, float], tuple[float, float, float], float], ...] = (
    ((19.0, -4.0, -1.0), (4.0, 8.0, 5.0), 0.12),  # globus pallidus
    ((25.0, 3.0, 1.0), (5.5, 13.0, 8.0), 0.05),  # putamen
    ((13.0, 12.0, 10.0), (4.5, 8.0, 8.0), 0.05),  # caudate head
    ((11.0, -18.0, 7.0), (7.0, 11.0, 7.0), 0.015),  # thalamus
    ((5.0, -20.0, -8.0), (3.0, 3.0, 3.0), 0.10),  # red nucleus
    ((11.0, -18.0, -12.0), (3.0, 7.0, 3.0), 0.12),  # substantia nigra
    ((14.0, -57.0, -33.0), (6.0, 8.0, 5.0), 0.08),  # dentate nucleus
)


@dataclass(frozen=True)
class Template:
    """The template as a (voxels, channels) uint8 stack on its own grid."""

    stack: NDArray[np.uint8]
    shape: tuple[int, int, int]
    affine: NDArray[np.float64]


@dataclass
class Anatomy:
    """One subject's tissue maps on the subject grid (RAS affine, axis-aligned)."""

    gm: F32
    wm: F32
    csf: F32
    brain: NDArray[np.bool_]
    deep_chi: F32
    dvent: F32
    dout: F32
    infra: NDArray[np.bool_]
    affine: NDArray[np.float64]

    @property
    def spacing(self) -> float:
        """Isotropic voxel size in mm."""
        return float(self.affine[0, 0])


def _mm_grid(shape: tuple[int, ...], affine: NDArray[np.float64]) -> tuple[F32, F32, F32]:
    """Broadcastable x, y, z world coordinates (mm) of an axis-aligned grid."""
    axes = [
        (affine[a, a] * np.arange(n) + affine[a, 3]).astype(np.float32) for a, n in enumerate(shape)
    ]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def _deep_chi(shape: tuple[int, ...], affine: NDArray[np.float64]) -> F32:
    """Susceptibility (ppm) of the deep grey nuclei, as smooth ellipsoids."""
    x, y, z = _mm_grid(shape, affine)
    chi = np.zeros(shape, np.float32)
    for (cx, cy, cz), (ax, ay, az), val in _NUCLEI:
        for side in (-1.0, 1.0):
            d2 = ((x - side * cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2
            chi = np.maximum(chi, val * np.clip(1.5 - d2, 0.0, 1.0))
    return chi


def _infratentorial(shape: tuple[int, ...], affine: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Below a sloped tentorium (cerebellum) plus the brainstem column."""
    x, y, z = _mm_grid(shape, affine)
    tent = -10.0 + 0.3 * (y + 50.0) - 0.15 * np.abs(x)
    cerebellum = (y < -30.0) & (z < tent)
    brainstem = (np.abs(x) < 12.0) & (y > -45.0) & (y < -8.0) & (z < -12.0)
    return np.asarray(cerebellum | brainstem)


def _ventricles(brain: NDArray[np.bool_], csf: F32, dout: F32, affine: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Deep, central CSF: the lateral and third ventricles."""
    x, y, z = _mm_grid(brain.shape, affine)
    central = (np.abs(x) < 32.0) & (y > -50.0) & (y < 35.0) & (z > -15.0) & (z < 35.0)
    vent = brain & (csf > 0.6) & (dout > 14.0) & central
    lab, n = ndimage.label(vent)
    if n == 0:
        return vent
    sizes = ndimage.sum_labels(vent, lab, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1
    return np.asarray(np.isin(lab, keep))


def _quantise_mm(d_mm: NDArray[np.float64]) -> NDArray[np.uint8]:
    return np.clip(np.rint(d_mm * _DIST_SCALE), 0, 255).astype(np.uint8)


@lru_cache(maxsize=2)
def load_template(resolution: int = 2) -> Template:
    """Load the nilearn MNI152 template (offline) and derive the channel stack."""
    from nilearn.datasets import (
        load_mni152_gm_template,
        load_mni152_template,
        load_mni152_wm_template,
    )

    t1_img = load_mni152_template(resolution=resolution)
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    t1 = np.asarray(t1_img.get_fdata(), dtype=np.float32)
    gm = np.asarray(load_mni152_gm_template(resolution=resolution).get_fdata(), dtype=np.float32)
    wm = np.asarray(load_mni152_wm_template(resolution=resolution).get_fdata(), dtype=np.float32)
    brain = t1 > 0.05
    csf = np.where(brain, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
    spacing = float(affine[0, 0])
    dout = ndimage.distance_transform_edt(brain) * spacing
    vent = _ventricles(brain, csf, dout.astype(np.float32), affine)
    dvent = ndimage.distance_transform_edt(~vent)
    chans = [
        np.rint(gm * 255).astype(np.uint8),
        np.rint(wm * 255).astype(np.uint8),
        brain.astype(np.uint8),
        np.rint(_deep_chi(t1.shape, affine) * 1000).astype(np.uint8),
        _quantise_mm(dvent * spacing),
        _quantise_mm(dout),
        _infratentorial(t1.shape, affine).astype(np.uint8),
    ]
    stack = np.ascontiguousarray(np.stack([c.ravel() for c in chans], axis=1))
    shape = (int(t1.shape[0]), int(t1.shape[1]), int(t1.shape[2]))
    return Template(stack=stack, shape=shape, affine=affine)


def _rbf_weights(n: int, n_ctrl: int, width: float) -> F32:
    """(n, n_ctrl) Gaussian radial-basis weights for a smooth 1-D field."""
    pos = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    ctrl = np.linspace(0.0, 1.0, n_ctrl, dtype=np.float32)[None, :]
    return np.exp(-0.5 * ((pos - ctrl) / width) ** 2).astype(np.float32)


def smooth_field(shape: tuple[int, int, int], coeffs: F32, width: float = 0.18) -> F32:
    """Expand a coarse (cx, cy, cz) coefficient grid to a smooth full-size field.

    Separable tensor product of Gaussian RBFs: three small matmuls, no zoom.
    """
    wx, wy, wz = (_rbf_weights(n, c, width) for n, c in zip(shape, coeffs.shape))
    tmp = np.tensordot(coeffs, wz, axes=([2], [1]))  # (cx, cy, nz)
    tmp = np.tensordot(tmp, wy, axes=([1], [1]))  # (cx, nz, ny)
    out = np.tensordot(wx, tmp, axes=([1], [0]))  # (nx, nz, ny)
    return np.ascontiguousarray(out.transpose(0, 2, 1), dtype=np.float32)


def rotation(angles_deg: NDArray[np.float64]) -> NDArray[np.float64]:
    """Rotation matrix from roll/pitch/yaw in degrees (x, then y, then z)."""
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return np.asarray(rz @ ry @ rx)


@dataclass(frozen=True)
class WarpParams:
    """Per-subject geometry: head rotation (deg), global scale, deformation (mm)."""

    angles_deg: tuple[float, float, float]
    scale: float
    deform_mm: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> WarpParams:
        """Small head tilts (SD 3 deg pitch/roll, 2 deg yaw), scale 0.92-1.08."""
        ang = rng.normal(0.0, (3.0, 3.0, 2.0))
        return cls((float(ang[0]), float(ang[1]), float(ang[2])), float(rng.uniform(0.92, 1.08)),
                   float(rng.uniform(1.0, 3.0)))


def _source_index(tpl: Template, params: WarpParams, rng: np.random.Generator) -> NDArray[np.intp]:
    """Flat template index sampled by every subject voxel (nearest neighbour)."""
    shape, aff = tpl.shape, tpl.affine
    sp = float(aff[0, 0])
    centre = np.array([0.0, -18.0, 8.0])  # rotate about the brain centre, MNI mm
    minv = rotation(np.array(params.angles_deg)).T / params.scale
    x, y, z = _mm_grid(shape, aff)
    lin = [minv[r, 0] * (x - centre[0]) + minv[r, 1] * (y - centre[1]) + minv[r, 2] * (z - centre[2])
           for r in range(3)]
    flat = np.zeros(shape, np.intp)
    for r in range(3):
        coeffs = rng.normal(0.0, params.deform_mm, size=(6, 7, 6)).astype(np.float32)
        src_mm = lin[r] + centre[r] + smooth_field(shape, coeffs)
        idx = np.rint((src_mm - aff[r, 3]) / sp).astype(np.intp)
        np.clip(idx, 0, shape[r] - 1, out=idx)
        flat *= shape[r]
        flat += idx
    return flat


def make_anatomy(tpl: Template, params: WarpParams, atrophy: float, rng: np.random.Generator) -> Anatomy:
    """Warp the template into one subject and apply atrophy (0 none .. 1 severe).

    Atrophy enlarges the ventricles by up to 5 mm and thins the cortex (up to
    40 % of cortical GM partial volume replaced by CSF, mostly at the surface).
    """
    ch = tpl.stack[_source_index(tpl, params, rng).ravel()].reshape(*tpl.shape, -1)
    brain = ch[..., BRAIN] > 0
    gm = ch[..., GM].astype(np.float32) / 255.0
    wm = ch[..., WM].astype(np.float32) / 255.0
    deep = ch[..., DEEP_CHI].astype(np.float32) / 1000.0
    dvent = ch[..., DVENT].astype(np.float32) / _DIST_SCALE
    dout = ch[..., DOUT].astype(np.float32) / _DIST_SCALE
    grow = 0.5 + 5.0 * atrophy
    vent = brain & (dvent < grow)
    gm[vent] = 0.0
    wm[vent] = 0.0
    cortex = (deep == 0) & (gm > 0)
    thin = np.float32(0.4 * atrophy) * np.exp(-dout / np.float32(4.0))
    gm = np.where(cortex, gm * (1.0 - thin), gm).astype(np.float32)
    csf = np.where(brain, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
    dvent = np.maximum(dvent - grow, 0.0).astype(np.float32)
    return Anatomy(gm=gm, wm=wm, csf=csf, brain=brain, deep_chi=deep * (csf < 0.5), dvent=dvent,
                   dout=dout, infra=ch[..., INFRA] > 0, affine=tpl.affine.copy())
