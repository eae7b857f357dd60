"""Lesion source for the patient model, and the lesion-derived study features.

``load_lesion_source()`` returns the lesion model of ``msgate.model.lesions`` when its checkpoint is
installed, and otherwise :class:`HeuristicLesions`, a documented stand-in (FLAIR hyperintensity
threshold after bias normalisation, connected components, location rules on a ventricle/brain-edge
distance map, Rim+ score from the QSM shell contrast). Training and inference use the same source, so
the features the network sees at inference follow the distribution it was trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from msgate.model.types import LESION_LOCATIONS, LesionFinding, Volume

LESION_FEATURES: tuple[str, ...] = ("n_log", "vol_log", "periventricular_log", "juxtacortical_log",
                                    "infratentorial_log", "deep_wm_log", "rim_log", "mean_vol_log")


@dataclass(frozen=True)
class LesionOutput:
    """Label map in the FLAIR grid ([k, r, c], int16) and one finding per label."""

    labels: NDArray[np.int16]
    findings: tuple[LesionFinding, ...]


class LesionSource(Protocol):
    """What the patient model needs from a lesion model."""

    name: str

    def __call__(self, volumes: dict[str, Volume]) -> LesionOutput: ...


def _norm_flair(f: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """FLAIR divided by its smoothed brain intensity (bias removal), and a brain mask."""
    hi = float(np.percentile(f, 99.0)) or 1.0
    brain = ndimage.binary_fill_holes(ndimage.gaussian_filter(f, 1.0) > 0.15 * hi)
    lab, n = ndimage.label(brain)
    if n > 1:
        sizes = ndimage.sum_labels(brain, lab, index=np.arange(1, n + 1))
        brain = lab == (int(np.argmax(sizes)) + 1)
    w = brain.astype(np.float32)
    num = ndimage.gaussian_filter(f * w, 8.0)
    den = ndimage.gaussian_filter(w, 8.0) + 1e-6
    bias = num / den
    ratio = np.where(brain, f / np.maximum(bias, 1e-6), 0.0).astype(np.float32)
    med = float(np.median(ratio[brain])) if brain.any() else 1.0
    return ratio / max(med, 1e-6), np.asarray(brain)


def _location(comp: NDArray[np.bool_], dvent: NDArray[np.float32], dedge: NDArray[np.float32],
              z_mm: NDArray[np.float64], z_infra: float) -> str:
    if float(z_mm[comp].mean()) < z_infra:
        return "infratentorial"
    if float(dvent[comp].min()) <= 4.0:
        return "periventricular"
    if float(dedge[comp].min()) <= 8.0:
        return "juxtacortical"
    return "deep_wm"


def _rim_probability(comp: NDArray[np.bool_], qsm: NDArray[np.float32] | None, ref: float) -> float | None:
    if qsm is None:
        return None
    shell = ndimage.binary_dilation(comp, iterations=1) & ~comp
    if not shell.any():
        return 0.0
    contrast = float(np.percentile(qsm[shell], 75)) - ref
    return float(1.0 / (1.0 + math.exp(-(contrast - 0.025) / 0.006)))


class HeuristicLesions:
    """Stand-in lesion model (see module docstring); deterministic, no weights."""

    name = "heuristic-lesions-0.1"

    def __init__(self, threshold: float = 1.6, min_voxels: int = 2) -> None:
        self.threshold = threshold
        self.min_voxels = min_voxels

    def __call__(self, volumes: dict[str, Volume]) -> LesionOutput:
        flair = volumes["FLAIR"]
        f = np.asarray(flair.data, np.float32)
        ratio, brain = _norm_flair(f)
        core = ndimage.binary_erosion(brain, iterations=2)
        cand = (ratio > self.threshold) & core
        lab, n = ndimage.label(cand)
        spacing = np.array(flair.spacing)[::-1]  # (k, r, c) order
        vent = core & (ratio < 0.35)
        vent = ndimage.binary_opening(vent)
        dvent = ndimage.distance_transform_edt(~vent, sampling=spacing).astype(np.float32)
        dedge = ndimage.distance_transform_edt(brain, sampling=spacing).astype(np.float32)
        kk = np.arange(f.shape[0])
        z_k = (flair.affine_lps @ np.stack([np.zeros_like(kk), np.zeros_like(kk), kk, np.ones_like(kk)]))[2]
        z_mm = np.broadcast_to(z_k[:, None, None], f.shape)
        z_vent = float(z_mm[vent].min()) if vent.any() else float(z_k.min())
        qsm = self._qsm_on_flair(volumes)
        ref = float(np.median(qsm[brain])) if qsm is not None else 0.0
        voxel_ml = float(np.prod(spacing)) / 1000.0
        labels = np.zeros(f.shape, np.int16)
        findings: list[LesionFinding] = []
        objs = ndimage.find_objects(lab)
        for i, sl in enumerate(objs, start=1):
            if sl is None:
                continue
            comp_local = lab[sl] == i
            if int(comp_local.sum()) < self.min_voxels:
                continue
            comp = np.zeros(f.shape, bool)
            comp[sl] = comp_local
            lid = len(findings) + 1
            labels[comp] = lid
            k, r, c = (float(x) for x in np.argwhere(comp).mean(0))
            centroid = flair.affine_lps @ np.array([c, r, k, 1.0])
            findings.append(LesionFinding(
                label=lid, volume_ml=round(float(comp.sum()) * voxel_ml, 4),
                centroid_lps=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
                location=_location(comp, dvent, dedge, z_mm, z_vent - 12.0),
                rim_probability=_rim_probability(comp, qsm, ref)))
        return LesionOutput(labels, tuple(findings))

    @staticmethod
    def _qsm_on_flair(volumes: dict[str, Volume]) -> NDArray[np.float32] | None:
        qsm = volumes.get("QSM")
        if qsm is None:
            return None
        flair = volumes["FLAIR"]
        if qsm.data.shape == flair.data.shape and np.allclose(qsm.affine_lps, flair.affine_lps):
            return np.asarray(qsm.data, np.float32)
        from msgate.model.patient.preprocess import LPS_TO_RAS, _resample, to_meta

        k, r, c = flair.data.shape
        out = _resample(to_meta(qsm.data, qsm.affine_lps), LPS_TO_RAS @ flair.affine_lps, (c, r, k), "bilinear")
        return np.ascontiguousarray(out.transpose(2, 1, 0))


def load_lesion_source(kind: str = "auto", device: str = "cpu") -> LesionSource:
    """``heuristic``, ``lesion-model`` (issue 6 checkpoint) or ``auto`` (the lesion model if its
    checkpoint is installed, else the heuristic). A patient checkpoint records the kind it was trained
    with, and ``predict`` uses that kind, so the lesion features keep their training distribution."""
    if kind == "heuristic":
        return HeuristicLesions()
    try:
        from msgate.model.patient.lesionmodel import RealLesions

        return RealLesions(device=device)
    except (ImportError, FileNotFoundError, ValueError):
        if kind == "lesion-model":
            raise
        return HeuristicLesions()


def source_kind(source: LesionSource) -> str:
    """``heuristic`` or ``lesion-model``."""
    return "heuristic" if isinstance(source, HeuristicLesions) else "lesion-model"


def lesion_features(findings: tuple[LesionFinding, ...], qsm_present: bool) -> NDArray[np.float32]:
    """The ``LESION_FEATURES`` vector of one study (log1p counts and volumes)."""
    n = len(findings)
    vol = sum(f.volume_ml for f in findings)
    per_loc = [sum(1 for f in findings if f.location == loc) for loc in LESION_LOCATIONS]
    rim = sum(1 for f in findings if f.rim_positive) if qsm_present else 0
    mean_vol = vol / n if n else 0.0
    vals = [math.log1p(n), math.log1p(vol), *(math.log1p(c) for c in per_loc), math.log1p(rim),
            math.log1p(mean_vol * 10.0)]
    return np.asarray(vals, np.float32)
