"""Lesions: sampled as specs from the latent, then placed and rendered on the subject grid.

MS: ovoid lesions (periventricular ones with their long axis along the
ventricle normal, i.e. perpendicular to the ventricular wall: Dawson's
fingers), juxtacortical and infratentorial lesions, T1 black holes, and a
Rim+ paramagnetic rim (QSM only) on about 6 % (relapsing) to 13 %
(progressive) of lesions. cSVD: punctate and confluent deep-WM
hyperintensities, periventricular caps and lacunes; never rims, never
infratentorial.

The rim is a band of 0.8-1.9 mm (in mm, not voxels) centred on the lesion
edge, +0.03-0.06 ppm, covering 50-100 % of the edge (an arc or cap, not
always a full shell), drawn with its partial volume on the grid: at 2 mm a
1 mm rim fills at most half a voxel. Veins (``veins.py``) go into their own
map. Draws that only shape the susceptibility map come from a child stream
(``rng.spawn``), so FLAIR, T1, labels and every later draw of a subject are
the same as before they were added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from msgate.model.synth.anatomy import Anatomy
from msgate.model.synth.latent import Latent
from msgate.model.synth.veins import lesion_veins, medullary_veins

Location = Literal["periventricular", "juxtacortical", "infratentorial", "deep_wm"]
LOCATIONS: tuple[Location, ...] = ("periventricular", "juxtacortical", "infratentorial", "deep_wm")
RIM_P = {"RRMS": 0.06, "SPMS": 0.13, "PPMS": 0.13}


@dataclass(frozen=True)
class LesionSpec:
    """What to draw: kind, location class, semi-axes (mm), rim and black-hole flags."""

    kind: str  # ovoid / punctate / confluent / cap / lacune
    location: Location
    semi_axes: tuple[float, float, float]
    rim: bool = False
    black_hole: bool = False


@dataclass
class Lesion:
    """A placed lesion: its id in the label map plus ground truth."""

    id: int
    kind: str
    location: Location
    rim: bool
    black_hole: bool
    volume_mm3: float
    centre_mm: tuple[float, float, float]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return {"id": self.id, "kind": self.kind, "location": self.location, "rim": self.rim,
                "black_hole": self.black_hole, "volume_mm3": round(self.volume_mm3, 1),
                "centre_mm": [round(c, 1) for c in self.centre_mm]}


@dataclass
class LesionMaps:
    """Rendered lesions: label map (lesion ids), partial-volume fraction, rim and vein susceptibility (ppm)."""

    labels: NDArray[np.uint16]
    frac: NDArray[np.float32]
    rim_ppm: NDArray[np.float32]
    lesions: list[Lesion] = field(default_factory=list)
    vein_ppm: NDArray[np.float32] | None = None


def _axes(rng: np.random.Generator, median: float, sigma: float, ratio: tuple[float, float]) -> tuple[float, float, float]:
    """Ovoid semi-axes (mm): long axis log-normal, the two short axes a fraction of it."""
    long = float(np.clip(rng.lognormal(np.log(median), sigma), 1.0, 12.0))
    r = rng.uniform(*ratio, size=2)
    return long, float(long * r[0]), float(long * r[1])


def _ms_specs(lat: Latent, rng: np.random.Generator) -> list[LesionSpec]:
    n = int(rng.poisson(3.0 + 40.0 * lat.severity**1.2))
    locs = rng.choice(len(LOCATIONS), size=n, p=[0.45, 0.25, 0.12, 0.18])
    p_bh = 0.1 + 0.35 * lat.severity
    return [LesionSpec("ovoid", LOCATIONS[int(i)], _axes(rng, 3.5 + 2.5 * lat.severity, 0.35, (0.45, 0.8)),
                       rim=bool(rng.random() < RIM_P[lat.phenotype]),
                       black_hole=bool(rng.random() < p_bh)) for i in locs]


def _csvd_specs(lat: Latent, rng: np.random.Generator) -> list[LesionSpec]:
    s = lat.severity
    specs = [LesionSpec("punctate", "deep_wm" if rng.random() < 0.8 else "periventricular",
                        _axes(rng, 1.6, 0.25, (0.8, 1.0))) for _ in range(rng.poisson(6 + 35 * s))]
    specs += [LesionSpec("confluent", "deep_wm" if rng.random() < 0.6 else "periventricular",
                         _axes(rng, 5.0 + 5.0 * s, 0.2, (0.6, 0.9))) for _ in range(rng.poisson(0.5 + 4 * s))]
    specs += [LesionSpec("cap", "periventricular", _axes(rng, 4.0 + 3.0 * s, 0.2, (0.3, 0.5)))
              for _ in range(2 if rng.random() < 0.5 + 0.5 * s else 0)]
    specs += [LesionSpec("lacune", "deep_wm", _axes(rng, 2.5, 0.3, (0.7, 1.0)))
              for _ in range(rng.poisson(0.3 + 2.5 * s))]
    return specs


def sample_specs(lat: Latent, rng: np.random.Generator) -> list[LesionSpec]:
    """Lesion specs whose count and size grow with the latent severity."""
    return _ms_specs(lat, rng) if lat.diagnosis == "ms" else _csvd_specs(lat, rng)


def _candidates(an: Anatomy) -> dict[str, NDArray[np.intp]]:
    """Flat voxel indices where each kind of lesion may be seeded."""
    supra = an.brain & ~an.infra
    sp = an.spacing
    pv = supra & (an.wm > 0.4) & (an.dvent > 0) & (an.dvent <= max(3.0, 1.5 * sp))
    y = (an.affine[1, 1] * np.arange(an.wm.shape[1]) + an.affine[1, 3])[None, :, None]
    return {
        "periventricular": np.flatnonzero(pv),
        "juxtacortical": np.flatnonzero(supra & (an.wm > 0.4) & (an.gm > 0.25) & (an.dvent > 8) & (an.deep_chi == 0)),
        "infratentorial": np.flatnonzero(an.brain & an.infra & (an.wm > 0.5)),
        "deep_wm": np.flatnonzero(supra & (an.wm > 0.7) & (an.dvent > 6) & (an.gm < 0.15)),
        "cap": np.flatnonzero(pv & ((y > 10.0) | (y < -45.0))),
        "lacune": np.flatnonzero(supra & ((an.deep_chi > 0.03) | ((an.wm > 0.8) & (an.dvent > 6)))),
    }


def _normal(dvent: NDArray[np.float32], ijk: NDArray[np.intp], rng: np.random.Generator) -> NDArray[np.float64]:
    """Unit normal of the ventricular wall at a voxel (gradient of the distance map)."""
    lo = np.maximum(ijk - 1, 0)
    hi = np.minimum(ijk + 2, dvent.shape)
    patch = dvent[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float64)
    g = np.array([np.mean(np.diff(patch, axis=a)) if patch.shape[a] > 1 else 0.0 for a in range(3)])
    norm = np.linalg.norm(g)
    return g / norm if norm > 1e-6 else rng.normal(size=3) / np.sqrt(3.0)


def _orientation(spec: LesionSpec, normal: NDArray[np.float64], rng: np.random.Generator) -> NDArray[np.float64]:
    """Rotation whose first column is the lesion's long axis."""
    if spec.kind == "ovoid" and spec.location == "periventricular":
        long = normal
    elif spec.kind == "cap":
        return np.asarray(np.linalg.qr(np.column_stack([normal, rng.normal(size=(3, 2))]))[0])[:, [1, 2, 0]]
    else:
        long = rng.normal(size=3)
    basis = np.linalg.qr(np.column_stack([long, rng.normal(size=(3, 2))]))[0]
    return np.asarray(basis)


def _box(centre: NDArray[np.float64], r: int, shape: tuple[int, ...]) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Bounding box [lo, hi) of radius r voxels around a centre, clipped to the grid."""
    c = np.floor(centre).astype(np.intp)
    return np.maximum(c - r, 0), np.minimum(c + r + 1, np.asarray(shape))


def _ell_d(lo: NDArray[np.intp], hi: NDArray[np.intp], centre: NDArray[np.float64],
           rot: NDArray[np.float64], axes: tuple[float, float, float], sp: float) -> NDArray[np.float32]:
    """Normalised ellipsoid radius on a box: d <= 1 inside."""
    grids = np.meshgrid(*[(np.arange(a, b) - c) * sp for a, b, c in zip(lo, hi, centre)], indexing="ij")
    loc = np.tensordot(rot.T, np.stack(grids), axes=1)
    d = sum((loc[i] / axes[i]) ** 2 for i in range(3))
    return np.sqrt(d).astype(np.float32)


def _shape_d(spec: LesionSpec, rot: NDArray[np.float64], centre: NDArray[np.float64], an: Anatomy,
             rng: np.random.Generator) -> tuple[tuple[slice, ...], NDArray[np.float32]]:
    """Distance field of the lesion; confluent lesions are a union of 3-5 offset blobs."""
    sp = an.spacing
    grow = 1.8 if spec.kind == "confluent" else 1.0
    lo, hi = _box(centre, int(np.ceil(grow * max(spec.semi_axes) / sp)) + 4, an.wm.shape)
    d = _ell_d(lo, hi, centre, rot, spec.semi_axes, sp)
    if spec.kind == "confluent":
        sub = (spec.semi_axes[0] * 0.6, spec.semi_axes[1] * 0.6, spec.semi_axes[2] * 0.6)
        for _ in range(int(rng.integers(2, 5))):
            shift = centre + rng.normal(0, spec.semi_axes[0] * 0.6 / sp, size=3)
            d = np.minimum(d, _ell_d(lo, hi, shift, rot, sub, sp))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), d


def _seed(spec: LesionSpec, cands: dict[str, NDArray[np.intp]], an: Anatomy,
          rng: np.random.Generator) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
    """Pick a seed voxel for the spec; returns (centre voxel, wall normal) or None."""
    pool = cands[spec.kind] if spec.kind in ("cap", "lacune") else cands[spec.location]
    if pool.size == 0:
        return None
    ijk = np.array(np.unravel_index(int(pool[rng.integers(pool.size)]), an.wm.shape))
    normal = _normal(an.dvent, ijk, rng)
    centre = ijk.astype(np.float64)
    if spec.location == "periventricular" and spec.kind in ("ovoid", "cap"):
        long = spec.semi_axes[0] if spec.kind == "ovoid" else spec.semi_axes[2]
        centre = centre + normal * (0.5 * long / an.spacing)  # touch the wall, extend outward
    return centre, normal


def _rim(d: NDArray[np.float32], centre: NDArray[np.float64], lo: tuple[slice, ...], sp: float,
         thickness: float, coverage: float, qrng: np.random.Generator) -> NDArray[np.float32]:
    """Partial-volume fraction (0-1) of a rim band of ``thickness`` mm centred on the edge (d = 1).

    Signed distance to the edge ~ (d - 1) / |grad d|; a voxel of edge ``sp`` covers the band's overlap
    with [delta - sp/2, delta + sp/2]. ``coverage`` of the edge is kept: a cap around a random axis.
    """
    grad = np.stack(np.gradient(d.astype(np.float64), sp))
    delta = (d - 1.0) / np.maximum(np.linalg.norm(grad, axis=0), 1e-3)
    b0, b1 = -0.5 * thickness, 0.5 * thickness
    frac = np.clip(np.minimum(delta + sp / 2, b1) - np.maximum(delta - sp / 2, b0), 0.0, sp) / sp
    axis = qrng.normal(size=3)
    axis /= np.linalg.norm(axis)
    g = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) - c for s, c in zip(lo, centre)], indexing="ij"), -1)
    cos = (g @ axis) / np.maximum(np.linalg.norm(g, axis=-1), 1e-6)
    keep = np.clip((cos - (1.0 - 2.0 * coverage)) / 0.3 + 0.5, 0.0, 1.0)
    return (frac * keep).astype(np.float32)


def _render_one(spec: LesionSpec, lid: int, an: Anatomy, maps: LesionMaps,
                cands: dict[str, NDArray[np.intp]], rng: np.random.Generator,
                qrng: np.random.Generator) -> Lesion | None:
    """Draw one lesion into the maps; None when it found no room. ``qrng``: susceptibility-only draws."""
    seed = _seed(spec, cands, an, rng)
    if seed is None:
        return None
    centre, normal = seed
    rot = _orientation(spec, normal, rng)
    box, d = _shape_d(spec, rot, centre, an, rng)
    free = (maps.labels[box] == 0) & an.brain[box] & (an.csf[box] < 0.5)
    inside = (d <= 1.0) & free
    if not inside.any():
        return None
    maps.labels[box][inside] = lid
    frac = np.clip((1.2 - d) / 0.4, 0.0, 1.0)
    maps.frac[box] = np.where(inside, np.maximum(maps.frac[box], frac), maps.frac[box])
    if spec.rim:
        width, amp = int(rng.integers(1, 3)), float(rng.uniform(0.03, 0.06))  # main-stream draws, as before
        thick = 0.45 + 0.55 * width + float(qrng.uniform(-0.2, 0.3))
        band = _rim(d, centre, box, an.spacing, thick, float(qrng.uniform(0.5, 1.0)), qrng)
        maps.rim_ppm[box] = np.maximum(maps.rim_ppm[box], np.float32(amp) * band * an.brain[box])
    if maps.vein_ppm is not None:
        lesion_veins(maps.vein_ppm, an, spec.kind, centre, rot, spec.semi_axes, qrng)
    vox = an.spacing**3
    centre_mm = an.affine[:3, :3] @ centre + an.affine[:3, 3]
    return Lesion(lid, spec.kind, spec.location, spec.rim, spec.black_hole,
                  float(inside.sum()) * vox, (float(centre_mm[0]), float(centre_mm[1]), float(centre_mm[2])))


def place_lesions(specs: list[LesionSpec], an: Anatomy, rng: np.random.Generator) -> LesionMaps:
    """Place every spec on the subject grid; lesions that find no room are dropped."""
    shape = an.wm.shape
    maps = LesionMaps(np.zeros(shape, np.uint16), np.zeros(shape, np.float32), np.zeros(shape, np.float32),
                      vein_ppm=np.zeros(shape, np.float32))
    qrng = rng.spawn(1)[0]  # susceptibility-only draws: the main stream is untouched
    cands = _candidates(an)
    for spec in specs:
        les = _render_one(spec, len(maps.lesions) + 1, an, maps, cands, rng, qrng)
        if les is not None:
            maps.lesions.append(les)
    assert maps.vein_ppm is not None
    medullary_veins(maps.vein_ppm, an, qrng)
    return maps
