"""Segmentation threshold chosen on a validation cohort (never the test seed), part of training.

The sigmoid threshold and the minimum component size are picked on ``n`` subjects of cohort
``seed + 2`` (training uses ``seed`` and ``seed + 1``; evaluation defaults to seed 1000) to
maximise the mean of subject Dice and lesion-wise F1 for lesions >= 3 mm.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from msgate.model.lesions.data import synth_case
from msgate.model.lesions.evaluate import MIN_OVERLAP, Collected, diameter_mm, seg_metrics
from msgate.model.lesions.model import LesionModel
from msgate.model.lesions.segment import components, predict_prob, prepare, seg_input
from msgate.model.lesions.train import work_truth

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6)
MIN_VOXELS = (1, 2, 3)


def _score(prob_truth: list[tuple[np.ndarray, np.ndarray, float]], thr: float, min_vox: int) -> dict[str, float]:
    col = Collected()
    for s, (prob, gt, vox) in enumerate(prob_truth):
        pred, n = components(prob > thr, min_vox)
        g, p = gt > 0, pred > 0
        col.dice.append((int((g & p).sum()), int((~g & p).sum()), int((g & ~p).sum())))
        for i in np.unique(gt)[1:]:
            comp = gt == i
            col.gt_les.append((s, diameter_mm(comp.sum(), vox), bool(p[comp].mean() >= MIN_OVERLAP)))
        for j in range(1, n + 1):
            comp = pred == j
            col.pred_les.append((s, diameter_mm(comp.sum(), vox), bool(g[comp].sum() >= MIN_OVERLAP * comp.sum())))
    return seg_metrics(col, np.arange(len(prob_truth)))


def calibrate_threshold(model: LesionModel, seed: int, n: int, log: Any = None) -> dict[str, Any]:
    """Set ``model.preset.threshold`` / ``min_lesion_voxels`` from a validation cohort; returns the grid scores."""
    cache = []
    for i in range(1, n + 1):
        case = synth_case(seed + 2, i, resolution=model.preset.synth_resolution)
        grid, arrays = prepare(case.volumes, model.preset)
        prob = predict_prob(model.seg, seg_input(arrays), model.preset, model.device)
        cache.append((prob, work_truth(case, grid), float(np.prod(grid.spacing))))
    scores = {}
    for thr in THRESHOLDS:
        for mv in MIN_VOXELS:
            m = _score(cache, thr, mv)
            scores[f"{thr}/{mv}"] = {"dice": round(m["dice_mean"], 4), "f1_ge3": round(m["f1 >=3 mm"], 4)}
    best = max(scores, key=lambda k: scores[k]["dice"] + scores[k]["f1_ge3"])
    thr_s, mv_s = best.split("/")
    model.preset = dataclasses.replace(model.preset, threshold=float(thr_s), min_lesion_voxels=int(mv_s))
    if log is not None:
        log.log("calibration", seed=seed + 2, subjects=n, chosen=best, scores=scores)
    return {"seed": seed + 2, "subjects": n, "chosen": best, "scores": scores}
