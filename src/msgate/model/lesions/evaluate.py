"""Evaluation of a lesion model on held-out synthetic subjects: metrics.json + Markdown report + PNGs.

Segmentation is scored on the model's working grid (ground truth moved there by nearest neighbour):
per-subject Dice and lesion-wise detection by equivalent-sphere diameter bin (a ground-truth lesion is
detected when >= 10 % of its voxels are predicted; a predicted component is a true positive when >= 10 %
of its voxels are lesion, so one blob merging many lesions is not counted as many hits).
Rim+ is scored on patches centred on ground-truth lesions (the classifier alone, every variant)
and on the segmenter's candidates (end to end; a candidate's label is the Rim+ flag of the
ground-truth lesion it overlaps most, Rim- when it overlaps none), and, as a stress test, on the same
patches with extra Gaussian QSM noise (``STRESS_QSM_PPM``; variants suffixed ``@noise``). 95 % intervals:
percentile bootstrap over subjects (paired between variants).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from msgate.model.lesions.data import load_synth_folder, synth_case
from msgate.model.lesions.model import LesionModel
from msgate.model.lesions.patches import lesion_patches
from msgate.model.lesions.segment import prepare, segment_arrays
from msgate.model.lesions.train import work_truth
from msgate.model.types import LESION_LOCATIONS

BINS: tuple[tuple[str, float, float], ...] = (("<3 mm", 0.0, 3.0), ("3-6 mm", 3.0, 6.0), ("6-10 mm", 6.0, 10.0),
                                              (">=10 mm", 10.0, np.inf), (">=3 mm", 3.0, np.inf))


STRESS_QSM_PPM = 0.015  # stress test: extra Gaussian QSM noise (ppm) on the GT-lesion patches, "<variant>@noise"
STRESS_SEED = 99
MIN_OVERLAP = 0.1  # a detection needs >= 10 % of the lesion's (or the prediction's) voxels in common


def diameter_mm(voxels: float, vox_mm3: float) -> float:
    """Equivalent-sphere diameter of a lesion of ``voxels`` voxels."""
    return float((6.0 * voxels * vox_mm3 / np.pi) ** (1.0 / 3.0))


@dataclass
class Collected:
    """Per-subject raw results, enough for any bootstrap."""

    dice: list[tuple[int, int, int]] = field(default_factory=list)  # tp, fp, fn voxels
    gt_les: list[tuple[int, float, bool]] = field(default_factory=list)  # subject, diameter, detected
    pred_les: list[tuple[int, float, bool]] = field(default_factory=list)  # subject, diameter, true positive
    loc: list[tuple[int, int, int]] = field(default_factory=list)  # subject, truth, predicted (GT components)
    rim_gt: dict[str, list[float]] = field(default_factory=dict)  # variant -> logits on GT lesions
    rim_gt_y: list[tuple[int, int]] = field(default_factory=list)  # subject, label
    rim_cand: list[tuple[int, int, float]] = field(default_factory=list)  # subject, label, probability
    seconds: list[float] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)


def _score_case(model: LesionModel, case: Any, s: int, col: Collected) -> None:
    t0 = time.perf_counter()
    grid, arrays = prepare(case.volumes, model.preset)
    lesions = segment_arrays(model.seg, model.loc, model.preset, grid, arrays, model.device)
    rims = model.classify_arrays(arrays, lesions)
    col.seconds.append(time.perf_counter() - t0)
    gt, pred = work_truth(case, grid), lesions.work_labels
    vox = float(np.prod(grid.spacing))
    g, p = gt > 0, pred > 0
    col.dice.append((int((g & p).sum()), int((~g & p).sum()), int((g & ~p).sum())))
    truth = {les.id: les for les in case.lesions}
    gt_ids = [i for i in np.unique(gt) if i > 0]
    for i in gt_ids:
        comp = gt == i
        col.gt_les.append((s, diameter_mm(comp.sum(), vox), bool(p[comp].mean() >= MIN_OVERLAP)))
    pred_rim: dict[int, int] = {}
    for j in range(1, int(pred.max()) + 1):
        comp = pred == j
        if not comp.any():
            continue
        hits = gt[comp]
        hits = hits[hits > 0]
        col.pred_les.append((s, diameter_mm(comp.sum(), vox), bool(hits.size >= MIN_OVERLAP * comp.sum())))
        pred_rim[j] = int(truth[int(np.bincount(hits).argmax())].rim) if hits.size else 0
    for f in lesions.findings:
        prob = rims.probabilities.get(f.label)
        if prob is not None and f.label in pred_rim:
            col.rim_cand.append((s, pred_rim[f.label], float(prob)))
    if not gt_ids:
        return
    import torch

    from msgate.model.lesions.location import anatomy_maps, lesion_features

    maps = anatomy_maps(arrays["FLAIR"], grid.affine)
    feats = np.stack([lesion_features(gt == i, arrays["FLAIR"], maps, grid.affine) for i in gt_ids])
    with torch.no_grad():
        loc_pred = model.loc(torch.from_numpy(feats).to(model.device)).argmax(1).cpu().numpy()
    for i, lp in zip(gt_ids, loc_pred):
        col.loc.append((s, LESION_LOCATIONS.index(truth[int(i)].location), int(lp)))
    cents = [np.asarray(c) for c in ndimage.center_of_mass(np.ones(gt.shape), gt, index=gt_ids)]
    patches = lesion_patches(arrays["QSM"], arrays["FLAIR"], cents, model.preset.rim_patch)
    noisy = patches.copy()
    noisy[:, 0] += np.random.default_rng([STRESS_SEED, s]).normal(0.0, STRESS_QSM_PPM * 20.0, noisy[:, 0].shape)
    for name in model.rim:
        col.rim_gt.setdefault(name, []).extend(model.rim_logits(patches, name).tolist())
        col.rim_gt.setdefault(f"{name}@noise", []).extend(model.rim_logits(noisy.astype(np.float32), name).tolist())
    labels = [int(truth[int(i)].rim) for i in gt_ids]
    col.rim_gt_y.extend((s, y) for y in labels)
    if len(col.examples) < 8:
        logits = model.rim_logits(patches, "asymmetric")
        want = 1 if sum(e["label"] for e in col.examples) < 4 else 0
        for k, y in enumerate(labels):
            if y == want and len(col.examples) < 8:
                h = patches.shape[-1] // 2
                col.examples.append({"label": y, "p": float(1 / (1 + np.exp(-logits[k]))),
                                     "qsm": patches[k, 0, :, :, h].tolist(), "flair": patches[k, 1, :, :, h].tolist()})
                break


def collect(model: LesionModel, seed: int, n: int, protocol: str = "3d", progress: Any = None,
            data: Path | None = None) -> Collected:
    """Run the model on subjects 1..n of cohort ``seed`` (in memory), or the first n of a ``msgate synth`` folder."""
    col = Collected()
    task = progress.add_task("evaluate", total=n) if progress is not None else None
    cases = (load_synth_folder(data, n) if data is not None else
             (synth_case(seed, s + 1, resolution=model.preset.synth_resolution, protocol=protocol) for s in range(n)))
    for s, case in enumerate(cases):
        _score_case(model, case, s, col)
        if progress is not None:
            progress.advance(task)
    return col


def _f1(gt: NDArray[np.float64], pred: NDArray[np.float64]) -> float:
    """F1 from (detected flags of GT lesions, TP flags of predictions)."""
    rec = gt.mean() if gt.size else np.nan
    prec = pred.mean() if pred.size else np.nan
    return float(2 * rec * prec / (rec + prec)) if rec + prec > 0 else 0.0


def seg_metrics(col: Collected, subjects: NDArray[np.intp]) -> dict[str, float]:
    """Dice (mean over subjects with lesions, and pooled) and lesion-wise F1 by size bin."""
    d = np.asarray(col.dice, np.float64)[subjects]
    has = (d[:, 0] + d[:, 2]) > 0
    per = 2 * d[:, 0] / np.maximum(2 * d[:, 0] + d[:, 1] + d[:, 2], 1)
    out = {"dice_mean": float(per[has].mean()) if has.any() else np.nan,
           "dice_pooled": float(2 * d[:, 0].sum() / max(2 * d[:, 0].sum() + d[:, 1].sum() + d[:, 2].sum(), 1))}
    counts = np.bincount(subjects, minlength=len(col.dice))
    gl, pl = np.asarray(col.gt_les, np.float64), np.asarray(col.pred_les, np.float64)
    wg = counts[gl[:, 0].astype(int)] if gl.size else np.zeros(0)
    wp = counts[pl[:, 0].astype(int)] if pl.size else np.zeros(0)
    for name, lo, hi in BINS:
        mg = (gl[:, 1] >= lo) & (gl[:, 1] < hi) if gl.size else np.zeros(0, bool)
        mp = (pl[:, 1] >= lo) & (pl[:, 1] < hi) if pl.size else np.zeros(0, bool)
        g, p = np.repeat(gl[mg, 2], wg[mg]), np.repeat(pl[mp, 2], wp[mp])
        out[f"recall {name}"] = float(g.mean()) if g.size else np.nan
        out[f"precision {name}"] = float(p.mean()) if p.size else np.nan
        out[f"f1 {name}"] = _f1(g, p)
    return out


def rim_metrics(col: Collected, subjects: NDArray[np.intp]) -> dict[str, float]:
    """ROC-AUC and PR-AUC (average precision) per variant on GT lesions, and end to end on candidates."""
    counts = np.bincount(subjects, minlength=len(col.dice))
    yy = np.asarray(col.rim_gt_y, np.int64)
    out: dict[str, float] = {}
    if yy.size:
        w = counts[yy[:, 0]]
        y = np.repeat(yy[:, 1], w)
        for name, logits in col.rim_gt.items():
            sc = np.repeat(np.asarray(logits), w)
            ok = 0 < y.sum() < y.size
            out[f"roc_auc {name}"] = float(roc_auc_score(y, sc)) if ok else np.nan
            out[f"pr_auc {name}"] = float(average_precision_score(y, sc)) if ok else np.nan
        out["prevalence"] = float(y.mean())
    cc = np.asarray(col.rim_cand, np.float64)
    if cc.size:
        w = counts[cc[:, 0].astype(int)]
        y, sc = np.repeat(cc[:, 1], w), np.repeat(cc[:, 2], w)
        ok = 0 < y.sum() < y.size
        out["roc_auc candidates"] = float(roc_auc_score(y, sc)) if ok else np.nan
        out["pr_auc candidates"] = float(average_precision_score(y, sc)) if ok else np.nan
    for sfx in ("", "@noise"):
        if f"pr_auc asymmetric{sfx}" not in out:
            continue
        for other in ("stacked", "asymmetric_nopretrain"):
            if f"pr_auc {other}{sfx}" in out:
                for met in ("pr_auc", "roc_auc"):
                    out[f"delta {met} asymmetric{sfx}-{other}{sfx}"] = out[f"{met} asymmetric{sfx}"] - out[f"{met} {other}{sfx}"]
    return out


def bootstrap(col: Collected, n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    """Point estimate and 95 % percentile interval of every metric (subjects resampled)."""
    n = len(col.dice)
    full = np.arange(n)
    point = {**seg_metrics(col, full), **rim_metrics(col, full)}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        vals = {**seg_metrics(col, idx), **rim_metrics(col, idx)}
        for k in point:
            draws[k].append(vals.get(k, np.nan))
    out = {}
    for k, v in point.items():
        arr = np.asarray(draws[k], np.float64)
        arr = arr[np.isfinite(arr)]
        lo, hi = (np.percentile(arr, [2.5, 97.5]) if arr.size else (np.nan, np.nan))
        out[k] = {"value": round(float(v), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)]}
    return out


def run_evaluation(model: LesionModel, *, seed: int, subjects: int, out_dir: Path, protocol: str = "3d",
                   n_boot: int = 1000, threads: int = 1, quiet: bool = False, data: Path | None = None) -> dict[str, Any]:
    """Evaluate, then write ``metrics.json``, ``report.md`` and the PNG figures into ``out_dir``."""
    from rich.progress import Progress

    from msgate.model.lesions import report

    out_dir.mkdir(parents=True, exist_ok=True)
    with Progress(disable=quiet) as progress:
        col = collect(model, seed, subjects, protocol, progress, data)
    subjects = len(col.dice)
    metrics = bootstrap(col, n_boot, seed)
    train_seed = int(model.meta.get("seed", 0))
    info = {"model": "msgate-lesions", "version": model.version, "preset": model.preset.name, "subjects": subjects,
            "seed": seed if data is None else f"folder {data.name}", "protocol": protocol if data is None else "as written", "train_seeds": f"{train_seed}, {train_seed + 1}", "n_boot": n_boot,
            "threads": threads, "median_s": float(np.median(col.seconds)), "spacing": model.preset.spacing_mm}
    cm = report.location_confusion(col)
    counts = {"gt_lesions": len(col.gt_les), "pred_lesions": len(col.pred_les), "rim_gt_lesions": len(col.rim_gt_y),
              "rim_positive": int(sum(y for _, y in col.rim_gt_y)), "candidates": len(col.rim_cand)}
    doc = {"info": info, "counts": counts, "metrics": metrics, "location_confusion": cm,
           "seconds_per_case": {"median": float(np.median(col.seconds)), "max": float(np.max(col.seconds))}}
    (out_dir / "metrics.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    report.fig_seg(metrics, out_dir / "seg_by_size.png")
    report.fig_rim(col, out_dir / "rim_roc.png", out_dir / "rim_pr.png")
    report.fig_examples(col, out_dir / "examples.png")
    (out_dir / "report.md").write_text(report.markdown(metrics, info, cm))
    return doc
