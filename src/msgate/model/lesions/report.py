"""Figures and the Markdown report of ``msgate evaluate lesions``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from msgate.model.lesions.evaluate import BINS, Collected  # noqa: E402
from msgate.model.types import LESION_LOCATIONS  # noqa: E402


def _ci(m: dict[str, Any], key: str) -> str:
    if key not in m:
        return "n/a"
    v = m[key]
    if not np.isfinite(v["value"]):
        return "n/a"
    return f"{v['value']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"


def fig_seg(m: dict[str, Any], out: Path) -> None:
    """Lesion-wise recall / precision / F1 by size bin, with intervals."""
    names = [b[0] for b in BINS]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, (stat, colour) in enumerate((("recall", "C0"), ("precision", "C1"), ("f1", "C2"))):
        vals = [m.get(f"{stat} {n}", {"value": np.nan, "ci95": [np.nan, np.nan]}) for n in names]
        y = np.array([v["value"] for v in vals])
        err = np.abs(np.array([v["ci95"] for v in vals]).T - y)
        ax.bar(np.arange(len(names)) + (k - 1) * 0.27, y, 0.27, yerr=err, label=stat, color=colour, capsize=2)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("lesion-wise")
    ax.set_title(f"Detection by size (Dice {m['dice_mean']['value']:.3f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def fig_rim(col: Collected, out_roc: Path, out_pr: Path) -> None:
    """ROC and PR curves of every Rim+ variant on ground-truth lesions, plus end-to-end candidates."""
    y = np.array([v for _, v in col.rim_gt_y])
    curves = {name: (y, np.asarray(s)) for name, s in col.rim_gt.items()}
    if col.rim_cand:
        cc = np.asarray(col.rim_cand)
        curves["candidates (end to end)"] = (cc[:, 1], cc[:, 2])
    for path, kind in ((out_roc, "roc"), (out_pr, "pr")):
        fig, ax = plt.subplots(figsize=(4.5, 4.2))
        for name, (yy, ss) in curves.items():
            if not 0 < yy.sum() < yy.size:
                continue
            if kind == "roc":
                fpr, tpr, _ = roc_curve(yy, ss)
                ax.plot(fpr, tpr, label=name)
            else:
                pr, rc, _ = precision_recall_curve(yy, ss)
                ax.plot(rc, pr, label=name)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
        else:
            ax.axhline(y.mean() if y.size else 0, color="k", ls=":", lw=0.8)
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
        ax.set_title("Rim+ " + ("ROC" if kind == "roc" else "precision-recall"))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def fig_examples(col: Collected, out: Path) -> None:
    """Central axial slices of example lesion patches: QSM (top) and FLAIR (bottom)."""
    ex = col.examples[:8]
    if not ex:
        return
    fig, axes = plt.subplots(2, len(ex), figsize=(1.6 * len(ex), 3.6), squeeze=False)
    for i, e in enumerate(ex):
        axes[0, i].imshow(np.asarray(e["qsm"]).T, cmap="gray", vmin=-1, vmax=1.5, origin="lower")
        axes[1, i].imshow(np.asarray(e["flair"]).T, cmap="gray", vmin=0, vmax=2.5, origin="lower")
        axes[0, i].set_title(f"{'Rim+' if e['label'] else 'Rim-'} p={e['p']:.2f}", fontsize=7)
        for a in axes[:, i]:
            a.set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def location_confusion(col: Collected) -> list[list[int]]:
    """Rows truth, columns predicted, ``LESION_LOCATIONS`` order (GT components)."""
    cm = np.zeros((len(LESION_LOCATIONS),) * 2, int)
    for _, t, p in col.loc:
        cm[t, p] += 1
    return cm.tolist()


def markdown(m: dict[str, Any], info: dict[str, Any], cm: list[list[int]]) -> str:
    """The report text (figures referenced by relative path)."""
    rows = "\n".join(f"| {n} | {_ci(m, f'recall {n}')} | {_ci(m, f'precision {n}')} | {_ci(m, f'f1 {n}')} |"
                     for n, _, _ in BINS)
    variants = [k.split(" ", 1)[1] for k in m if k.startswith("roc_auc ")]
    rim_rows = "\n".join(f"| {v} | {_ci(m, f'roc_auc {v}')} | {_ci(m, f'pr_auc {v}')} |" for v in variants)
    deltas = "\n".join(f"| {k.split(' ')[1]}: {k.split(' ')[2].replace('-', ' minus ')} | {_ci(m, k)} |"
                       for k in m if k.startswith("delta "))
    cm_rows = "\n".join(f"| {LESION_LOCATIONS[i]} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(cm))
    total = sum(sum(r) for r in cm)
    acc = sum(cm[i][i] for i in range(len(cm))) / total if total else float("nan")
    return f"""# Lesion model evaluation

Model `{info['model']}` version {info['version']}, preset `{info['preset']}`; {info['subjects']} held-out synthetic
subjects (cohort seed {info['seed']}, protocol `{info['protocol']}`), never seen in training (training seeds
{info['train_seeds']}). Intervals: 95 % percentile bootstrap over subjects ({info['n_boot']} resamples).
Inference time per case (segmentation + Rim+, CPU, {info['threads']} thread(s)): median {info['median_s']:.2f} s.

## Segmentation

Dice (mean over subjects with lesions): **{_ci(m, 'dice_mean')}**; pooled voxel Dice {_ci(m, 'dice_pooled')}.
Scored on the {info['spacing']} mm working grid. Lesion-wise: a ground-truth lesion is detected when >= 10 %
of its voxels are predicted; a predicted component is a true positive when >= 10 % of its voxels are
lesion; size = equivalent-sphere diameter (of the ground-truth lesion for recall, of the predicted
component for precision).

| size bin | recall | precision | F1 |
|---|---|---|---|
{rows}

![detection by size](seg_by_size.png)

Location class on ground-truth lesions (rows truth, columns predicted; accuracy {acc:.3f}):

| truth \\ predicted | {' | '.join(LESION_LOCATIONS)} |
|---|---|---|---|---|
{cm_rows}

## Rim+ classification

On patches centred on ground-truth lesions (prevalence {m.get('prevalence', {}).get('value', float('nan')):.3f}),
end to end on the segmenter's candidates (label from the overlapping ground-truth lesion, Rim- for
false positives), and on the same ground-truth patches with extra QSM noise (`@noise`, stress test):

| variant | ROC-AUC | PR-AUC |
|---|---|---|
{rim_rows}

Ablations (paired differences, same subjects):

| difference | value [95 % CI] |
|---|---|
{deltas}

![ROC](rim_roc.png) ![PR](rim_pr.png)

Example patches (central axial slice; top QSM, bottom FLAIR; p = asymmetric model's Rim+ probability):

![examples](examples.png)

Synthetic data only; not for clinical use.
"""
