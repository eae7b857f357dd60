"""Veins in the susceptibility map: the main structured confounder of Rim+ reading on QSM.

Deoxygenated venous blood is paramagnetic (about +0.3-0.45 ppm against tissue). Veins of 0.4-1 mm
diameter fill a fraction of a 1-2 mm voxel, so they appear as faint bright lines and dots:

* a **central vein** runs through most MS lesions along their long axis (central vein sign; about
  60 % of MS lesions here, 25 % of cSVD lesions, none in lacunes);
* a **juxtalesional vein** grazing a lesion's edge (25 % of lesions) looks like a partial rim;
* **deep medullary veins** run radially towards the ventricles through the white matter.

They are drawn on the susceptibility map only: veins are not visible on FLAIR or T1.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from msgate.model.synth.anatomy import Anatomy
from msgate.model.synth.qsm import line_profile

F32 = NDArray[np.float32]
CENTRAL_VEIN_P = {"ovoid": 0.6, "punctate": 0.25, "confluent": 0.25, "cap": 0.25, "lacune": 0.0}
JUXTA_VEIN_P = 0.25


def _add(vmap: F32, an: Anatomy, p0: NDArray[np.float64], p1: NDArray[np.float64], radius: float,
         chi: float) -> None:
    drawn = line_profile(vmap.shape, an.spacing, p0, p1, radius)  # type: ignore[arg-type]
    if drawn is None:
        return
    box, frac = drawn
    val = np.float32(chi) * frac * an.brain[box]
    vmap[box] = np.maximum(vmap[box], val)


def lesion_veins(vmap: F32, an: Anatomy, kind: str, centre: NDArray[np.float64], rot: NDArray[np.float64],
                 semi_axes: tuple[float, float, float], rng: np.random.Generator) -> None:
    """Central and juxtalesional veins of one lesion (centre in voxels, ``rot`` columns = lesion axes)."""
    sp = an.spacing
    long = rot[:, 0]
    half = (semi_axes[0] + float(rng.uniform(2.0, 6.0))) / sp
    if rng.random() < CENTRAL_VEIN_P.get(kind, 0.0):
        off = rng.normal(0.0, 0.25 * semi_axes[1] / sp, 3)
        off -= long * float(off @ long)
        _add(vmap, an, centre + off - long * half, centre + off + long * half,
             float(rng.uniform(0.2, 0.4)), float(rng.uniform(0.3, 0.45)))
    if kind != "lacune" and rng.random() < JUXTA_VEIN_P:
        side = rot[:, 1 + int(rng.integers(2))] * (1.0 if rng.random() < 0.5 else -1.0)
        r_side = semi_axes[1] if abs(float(side @ rot[:, 1])) > 0.5 else semi_axes[2]
        c = centre + side * (r_side + float(rng.uniform(0.0, 1.5))) / sp
        tilt = long + rng.normal(0.0, 0.3, 3)
        tilt /= np.linalg.norm(tilt)
        _add(vmap, an, c - tilt * half, c + tilt * half, float(rng.uniform(0.2, 0.45)), float(rng.uniform(0.3, 0.45)))


def _wall_normal(dvent: F32, ijk: NDArray[np.intp]) -> NDArray[np.float64]:
    lo, hi = np.maximum(ijk - 1, 0), np.minimum(ijk + 2, dvent.shape)
    patch = dvent[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float64)
    g = np.array([np.mean(np.diff(patch, axis=a)) if patch.shape[a] > 1 else 0.0 for a in range(3)])
    n = float(np.linalg.norm(g))
    return g / n if n > 1e-6 else np.array([0.0, 0.0, 1.0])


def medullary_veins(vmap: F32, an: Anatomy, rng: np.random.Generator) -> None:
    """Deep medullary veins: 40-80 radial segments of 8-25 mm in the supratentorial white matter."""
    pool = np.flatnonzero(an.brain & ~an.infra & (an.wm > 0.7) & (an.dvent > 3.0) & (an.dvent < 25.0))
    if pool.size == 0:
        return
    for _ in range(int(rng.integers(40, 81))):
        ijk = np.array(np.unravel_index(int(pool[rng.integers(pool.size)]), an.wm.shape))
        direc = _wall_normal(an.dvent, ijk) + rng.normal(0.0, 0.25, 3)
        direc /= np.linalg.norm(direc)
        half = float(rng.uniform(4.0, 12.5)) / an.spacing
        c = ijk.astype(np.float64)
        _add(vmap, an, c - direc * half, c + direc * half, float(rng.uniform(0.2, 0.45)), float(rng.uniform(0.3, 0.45)))
