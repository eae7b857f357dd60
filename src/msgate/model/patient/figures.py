"""Figures and the Markdown report of ``msgate evaluate patient`` (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from numpy.typing import NDArray  # noqa: E402
from sklearn.metrics import confusion_matrix, roc_curve  # noqa: E402

from msgate.model.patient.calibration import reliability  # noqa: E402
from msgate.model.patient.train import Data  # noqa: E402
from msgate.model.types import EDSS_BINS  # noqa: E402


def _save(fig: Any, report: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(report / name, dpi=90)
    plt.close(fig)
    return name


def make_all(report: Path, d: Data, mm: dict[str, NDArray[Any]], outs: dict[str, dict[str, Any]],
             metrics: dict[str, Any]) -> list[str]:
    """ROC, confusion matrix, reliability, EDSS scatter and ablation figures; returns file names."""
    names = []
    fig, ax = plt.subplots(1, 2, figsize=(9, 4))
    for label, o in [("multimodal", mm), *outs.items()]:
        fpr, tpr, _ = roc_curve(d.ms, o["p_ms"])
        ax[0].plot(fpr, tpr, label=label)
    ax[0].set(title="MS vs cSVD ROC", xlabel="1 - specificity", ylabel="sensitivity")
    ax[0].legend(fontsize=7)
    for k in range(4):
        if 0 < (d.edss_class == k).sum() < len(d):
            fpr, tpr, _ = roc_curve(d.edss_class == k, mm["edss_probs"][:, k])
            ax[1].plot(fpr, tpr, label=f"EDSS {EDSS_BINS[k]}")
    ax[1].set(title="EDSS bin one-vs-rest ROC (multimodal)", xlabel="1 - specificity")
    ax[1].legend(fontsize=7)
    names.append(_save(fig, report, "roc.png"))
    fig, ax = plt.subplots(figsize=(4.5, 4))
    cm = confusion_matrix(d.edss_class, mm["edss_probs"].argmax(1), labels=range(4))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set(xticks=range(4), yticks=range(4), xticklabels=EDSS_BINS, yticklabels=EDSS_BINS,
           xlabel="predicted", ylabel="true", title="EDSS bin confusion")
    names.append(_save(fig, report, "confusion.png"))
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for label, p in (("uncalibrated", mm["edss_probs_raw"]), ("temperature-scaled", mm["edss_probs"])):
        c, a, _ = reliability(p, d.edss_class)
        ax.plot(c, a, "o-", label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ece = metrics["models"]["multimodal"]["edss_ece"]["value"]
    ax.set(xlabel="confidence", ylabel="accuracy", title=f"Reliability (EDSS bin), ECE {ece:.3f}")
    ax.legend(fontsize=8)
    names.append(_save(fig, report, "reliability.png"))
    fig, ax = plt.subplots(figsize=(4.5, 4))
    jitter = np.random.default_rng(0).normal(0, 0.08, len(d))
    ax.scatter(d.edss + jitter, mm["edss"] + jitter, s=8, alpha=0.6)
    ax.plot([0, 9.5], [0, 9.5], "k--", lw=0.8)
    ax.set(xlabel="true EDSS", ylabel="predicted EDSS", title="EDSS estimate")
    names.append(_save(fig, report, "edss_scatter.png"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    keys = list(metrics["ablation"])
    vals = [metrics["ablation"][k]["edss_balanced_accuracy"] for k in keys]
    ax.bar(keys, [v["value"] for v in vals],
           yerr=[[v["value"] - v["ci_low"] for v in vals], [v["ci_high"] - v["value"] for v in vals]])
    ax.set(ylabel="EDSS balanced accuracy", title="Missing-modality ablation")
    ax.tick_params(axis="x", rotation=30)
    names.append(_save(fig, report, "ablation.png"))
    return names


def gradcam_overlays(report: Path, model: Path | None, seed: int, indices: list[int]) -> list[str]:
    """Regenerate a few held-out subjects, run the full ``predict`` and overlay the heatmap on FLAIR."""
    from msgate.model.patient.synthdata import synth_case
    from msgate.model.predict import load_model, predict

    pm = load_model(model)
    cases = [synth_case(seed, i)[0] for i in indices]
    results = predict(cases, pm)
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3.4), squeeze=False)
    for ax, case, res in zip(axes[0], cases, results):
        heat = res.heatmap if res.heatmap is not None else np.zeros_like(case.flair.data)
        per_slice = (res.lesion_mask > 0).reshape(heat.shape[0], -1).sum(1)
        k = int(np.argmax(per_slice)) if per_slice.any() else heat.shape[0] // 2
        ax.imshow(case.flair.data[k], cmap="gray")
        ax.imshow(heat[k], cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.contour(res.lesion_mask[k] > 0, levels=[0.5], colors="lime", linewidths=0.6)
        ax.set_title(f"EDSS {res.edss_label} p={res.confidence:.2f}\nP(MS)={res.p_ms:.2f}", fontsize=8)
        ax.axis("off")
    return [_save(fig, report, "gradcam.png")]


def _fmt(m: dict[str, float]) -> str:
    return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def _floor(m: dict[str, Any]) -> str:
    f = m.get("edss_ece_floor")
    return f"{f['mean']:.3f} / {f['p95']:.3f}" if f else "-"


def _diff(m: dict[str, float]) -> str:
    return f"{m['value']:+.3f} [{m['ci_low']:+.3f}, {m['ci_high']:+.3f}]"


def markdown(metrics: dict[str, Any], figs: list[str]) -> str:
    """The report body: tables of every model, paired differences, targets and the ablation, then the figures."""
    cols = ("edss_balanced_accuracy", "edss_mae", "edss_ece", "ms_auc", "ms_ece")
    head = "| model | " + " | ".join(cols) + " | ECE floor (mean / p95) |"
    lines = ["# Patient model evaluation", "", f"Model: `{metrics['model']}`", "",
             f"Held-out patients: {metrics['n_test']}; EDSS bin counts {metrics['edss_class_counts_test']}.",
             "Values: point estimate [percentile bootstrap 95 % interval over patients]. ECE: top-label, 15 "
             "equal-width confidence bins. ECE floor: the same estimator on labels redrawn from the model's own "
             "probabilities (what a perfectly calibrated model with these outputs would score on this many "
             "patients). Research use only, not for diagnosis.", "", head, "|---" * (len(cols) + 2) + "|"]
    for name, m in metrics["models"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m[c]) for c in cols) + f" | {_floor(m)} |")
    lines += ["", f"EDSS ECE before temperature scaling: {_fmt(metrics['edss_ece_uncalibrated'])}", "",
              "## Multimodal minus baseline (paired bootstrap)", "",
              "| baseline | balanced accuracy (> 0 better) | MAE (< 0 better) |", "|---|---|---|"]
    for name, v in metrics.get("versus", {}).items():
        lines.append(f"| {name} | {_diff(v['edss_balanced_accuracy'])} | {_diff(v['edss_mae'])} |")
    t = metrics.get("targets", {})
    if t:
        lines += ["", "## Targets", "", f"- ≥ 0.9 × reference balanced accuracy: ratio {t['ratio_to_reference']}",
                  f"- MS vs cSVD ROC-AUC ≥ 0.97: {t['ms_auc_ge_0.97']}", f"- EDSS ECE ≤ 0.05: {t['ece_le_0.05']}"]
        lines += [f"- beats {k}: point {v['point']}, interval excludes 0 on both {v['significant']}"
                  for k, v in t["beats_baselines"].items()]
    lines += ["", "## Missing-modality ablation (multimodal model)", "",
              head, "|---" * (len(cols) + 2) + "|"]
    for name, m in metrics["ablation"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m[c]) for c in cols) + f" | {_floor(m)} |")
    rim = metrics["rim_count_mae"]
    lines += ["", f"Rim+ count MAE (QSM present): head {_fmt(rim['head'])}, lesion model {_fmt(rim['lesion_model'])}", ""]
    lines += [f"![{f}]({f})" for f in figs]
    return "\n".join(lines) + "\n"
