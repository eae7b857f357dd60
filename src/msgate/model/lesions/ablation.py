"""The Rim+ ablation experiment: every classifier variant trained the same way, scored with paired intervals.

Patch sets (ground-truth lesion centres on the working grid, as ``train.rim_set``) are simulated once and
cached as ``.npz``:

* ``train``: the Rim+ training cohort of ``train_lesion_model`` (seed ``s + 1``, Rim+ enriched);
* ``pool``: extra *unlabelled* lesions for self-supervised pretraining (same seed, later subjects,
  natural prevalence; their labels are stored but never read by training);
* ``val``: a validation cohort (seed ``s + 3``, natural prevalence) for design choices;
* ``test``: the held-out cohort (seed 1000 by default, natural prevalence), read only for the final table.

Scores are lesion-level ROC-AUC and PR-AUC (average precision); intervals are percentile bootstrap over
subjects, paired between variants, so a difference's interval accounts for the shared test lesions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from msgate.model.lesions.data import SynthCase, synth_case
from msgate.model.lesions.patches import lesion_patches
from msgate.model.lesions.presets import Preset
from msgate.model.lesions.segment import prepare


@dataclass
class PatchSet:
    """Lesion patches (N, 2, s, s, s) float16, Rim+ labels, subject index and lesion size (voxels)."""

    x: NDArray[np.float16]
    y: NDArray[np.int8]
    subject: NDArray[np.int32]
    voxels: NDArray[np.int32]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=self.x, y=self.y, subject=self.subject, voxels=self.voxels)

    @classmethod
    def load(cls, path: Path) -> PatchSet:
        z = np.load(path)
        return cls(z["x"], z["y"], z["subject"], z["voxels"])


def case_patches(case: SynthCase, preset: Preset) -> tuple[NDArray[np.float32], list[int], list[int]]:
    """Patches, Rim+ labels and voxel counts of the ground-truth lesions of one case."""
    from msgate.model.lesions.train import work_truth

    grid, arr = prepare(case.volumes, preset)
    gt = work_truth(case, grid)
    ids = [les.id for les in case.lesions if (gt == les.id).any()]
    if not ids or "QSM" not in arr:
        return np.zeros((0, 2) + (preset.rim_patch,) * 3, np.float32), [], []
    cents = ndimage.center_of_mass(np.ones(gt.shape), gt, index=ids)
    x = lesion_patches(arr["QSM"], arr["FLAIR"], [np.asarray(c) for c in cents], preset.rim_patch)
    rim = {les.id: les.rim for les in case.lesions}
    vox = ndimage.sum_labels(np.ones(gt.shape), gt, index=ids)
    return x, [int(rim[i]) for i in ids], [int(v) for v in vox]


def simulate_set(preset: Preset, seed: int, first: int, n: int, *, rim_enrich: float | None = None,
                 mix: dict[str, float] | None = None, progress: Any = None) -> PatchSet:
    """Patches of subjects ``first .. first + n - 1`` of cohort ``seed`` (3D protocol)."""
    xs, ys, ss, vs = [], [], [], []
    for i in range(first, first + n):
        case = synth_case(seed, i, resolution=preset.synth_resolution, mix=mix, rim_enrich=rim_enrich)
        x, y, v = case_patches(case, preset)
        xs.append(x.astype(np.float16))
        ys += y
        vs += v
        ss += [i] * len(y)
        if progress is not None:
            progress(i - first + 1, n)
    return PatchSet(np.concatenate(xs), np.asarray(ys, np.int8), np.asarray(ss, np.int32), np.asarray(vs, np.int32))


def pr_roc(y: NDArray[Any], score: NDArray[Any]) -> tuple[float, float]:
    """(ROC-AUC, PR-AUC); NaN when one class is missing."""
    if not 0 < int(y.sum()) < y.size:
        return float("nan"), float("nan")
    return float(roc_auc_score(y, score)), float(average_precision_score(y, score))


def paired_bootstrap(y: NDArray[Any], subject: NDArray[Any], scores: dict[str, NDArray[Any]],
                     pairs: list[tuple[str, str]], n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Point value and 95 % percentile interval of ROC/PR-AUC per variant and of PR/ROC differences.

    Subjects are resampled with replacement; every variant and difference uses the same resamples.
    """
    return seed_mean_bootstrap(y, subject, {k: [v] for k, v in scores.items()}, pairs, n_boot, seed)


def seed_mean_bootstrap(y: NDArray[Any], subject: NDArray[Any], scores: dict[str, list[NDArray[Any]]],
                        pairs: list[tuple[str, str]], n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """As :func:`paired_bootstrap` for variants trained with several seeds: each metric is the mean over a
    variant's seeds (one score array per training seed), differences are differences of those means.

    Every resample of subjects is shared by all variants and seeds, so the interval reflects the test set;
    the spread between training seeds enters only through the mean (report it separately).
    """
    subs, inv = np.unique(subject, return_inverse=True)
    rows = [np.flatnonzero(inv == k) for k in range(len(subs))]
    rng = np.random.default_rng(seed)

    def metrics(idx: NDArray[np.intp]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, scs in scores.items():
            vals = np.array([pr_roc(y[idx], sc[idx]) for sc in scs])
            out[f"roc_auc {name}"], out[f"pr_auc {name}"] = (float(v) for v in vals.mean(axis=0))
        for a, b in pairs:
            for m in ("pr_auc", "roc_auc"):
                out[f"delta {m} {a} - {b}"] = out[f"{m} {a}"] - out[f"{m} {b}"]
        return out

    point = metrics(np.arange(len(y)))
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        pick = rng.integers(0, len(subs), len(subs))
        vals = metrics(np.concatenate([rows[k] for k in pick]))
        for k in point:
            draws[k].append(vals[k])
    res = {}
    for k, v in point.items():
        arr = np.asarray(draws[k])
        arr = arr[np.isfinite(arr)]
        lo, hi = np.percentile(arr, [2.5, 97.5]) if arr.size else (np.nan, np.nan)
        res[k] = {"value": round(v, 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
                  "p_le_0": round(float((arr <= 0).mean()), 4) if k.startswith("delta") and arr.size else None}
    return res
