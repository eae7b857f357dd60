"""``msgate evaluate patient``: metrics.json + report.md with PNG figures on a held-out cache.

Compares the multimodal model with its image-only and EHR-only twins (trained the same way, given as
checkpoints in ``baseline_dir``), their late fusion (mean of calibrated probabilities and estimates),
a random forest on EHR + lesion-model features and the reference forest on the generator's truth.
Every metric carries a percentile-bootstrap 95 % interval.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from msgate.model.patient import checkpoint, figures
from msgate.model.patient.baselines import fit_predict_rf, reference_features, rf_features
from msgate.model.patient.calibration import sigmoid, softmax
from msgate.model.patient.ehr import EhrScaler
from msgate.model.patient.metrics import (
    bootstrap,
    ece_floor,
    ece_multi,
    edss_bal_acc,
    mae,
    paired_difference,
    summary,
)
from msgate.model.patient.train import RIM_FEATURE, Data, cache_files, infer_ensemble, load_data

log = logging.getLogger(__name__)
ABLATIONS: dict[str, dict[str, bool]] = {
    "all": {}, "no_qsm": {"qsm": False}, "no_t1": {"t1": False}, "no_ehr": {"ehr": False},
    "flair_only": {"qsm": False, "t1": False}, "flair_only_no_ehr": {"qsm": False, "t1": False, "ehr": False},
}


def _outputs(ck: checkpoint.PatientCheckpoint, d: Data, modality: dict[str, bool] | None = None) -> dict[str, NDArray[Any]]:
    raw = infer_ensemble(ck.nets, d, ck.scaler, modality)
    est = np.clip(np.round(raw["edss"] * 2) / 2, 0.0, 9.5)
    out = {"edss_probs": softmax(raw["edss_logits"], ck.t_edss), "edss_probs_raw": softmax(raw["edss_logits"]),
           "edss": est, "p_ms": sigmoid(raw["ms_logit"], ck.t_ms), "rim": np.exp(raw["rim_log_rate"])}
    alt = ck.meta.get("alternative_calibration")
    if alt and modality is None:
        out["edss_probs_alt"] = softmax(raw["edss_logits"] / float(alt["temperature_edss"])
                                        + np.asarray(alt["edss_prior_offset"]))
    return out


def _block(d: Data, o: dict[str, NDArray[Any]], n: int) -> dict[str, Any]:
    out: dict[str, Any] = summary(d.edss_class.astype(float), d.edss.astype(float), d.ms.astype(float),
                                  o["edss_probs"], np.asarray(o["edss"], float), o["p_ms"], n=n)
    out["edss_ece_floor"] = ece_floor(o["edss_probs"])
    return out


def _versus(d: Data, mm: dict[str, NDArray[Any]], outs: dict[str, dict[str, Any]], n: int) -> dict[str, Any]:
    """Paired bootstrap differences multimodal - baseline: balanced accuracy (> 0 is better) and MAE
    (< 0 is better), on the same patient resamples."""
    y, ye = d.edss_class.astype(float), d.edss.astype(float)
    return {name: {"edss_balanced_accuracy": paired_difference(edss_bal_acc, y, mm["edss_probs"], o["edss_probs"], n),
                   "edss_mae": paired_difference(mae, ye, np.asarray(mm["edss"], float), np.asarray(o["edss"], float), n)}
            for name, o in outs.items() if name != "reference_truth"}


def _targets(metrics: dict[str, Any]) -> dict[str, Any]:
    """The issue-7 targets read off the metrics (point estimates and paired intervals)."""
    m = metrics["models"]
    mm = m["multimodal"]
    ref = m.get("reference_truth", {}).get("edss_balanced_accuracy", {}).get("value")
    beats = {name: {"bal_acc_diff_ci_low": v["edss_balanced_accuracy"]["ci_low"],
                    "mae_diff_ci_high": v["edss_mae"]["ci_high"],
                    "point": v["edss_balanced_accuracy"]["value"] > 0 and v["edss_mae"]["value"] < 0,
                    "significant": v["edss_balanced_accuracy"]["ci_low"] > 0 and v["edss_mae"]["ci_high"] < 0}
             for name, v in metrics["versus"].items()}
    return {"beats_baselines": beats,
            "ratio_to_reference": round(mm["edss_balanced_accuracy"]["value"] / ref, 4) if ref else None,
            "ms_auc_ge_0.97": mm["ms_auc"]["value"] >= 0.97,
            "ece_le_0.05": mm["edss_ece"]["value"] <= 0.05}


def _baselines(d: Data, raw_te: dict[str, Any], train_path: Path | None, baseline_dir: Path | None,
               mm: dict[str, Any], n: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    metrics: dict[str, Any] = {}
    outs: dict[str, dict[str, Any]] = {}
    if baseline_dir is not None:
        for name in ("image", "ehr"):
            p = baseline_dir / f"patient-{name}.pt"
            if p.is_file():
                outs[f"{name}_only"] = _outputs(checkpoint.load(p), d)
        if "image_only" in outs and "ehr_only" in outs:
            a, b = outs["image_only"], outs["ehr_only"]
            outs["late_fusion"] = {"edss_probs": (a["edss_probs"] + b["edss_probs"]) / 2,
                                   "edss": np.clip(np.round((a["edss"] + b["edss"])), 0, 19) / 2,
                                   "p_ms": (a["p_ms"] + b["p_ms"]) / 2}
    if train_path is not None:
        tr, raw_tr = load_data(train_path)
        mean = EhrScaler.fit(tr.ehr_x, tr.ehr_m).mean
        outs["random_forest"] = fit_predict_rf(rf_features(tr, mean), tr, rf_features(d, mean))
        outs["reference_truth"] = fit_predict_rf(reference_features(raw_tr), tr, reference_features(raw_te))
    for name, o in outs.items():
        metrics[name] = _block(d, o, n)
    metrics["multimodal"] = _block(d, mm, n)
    alt = mm.get("edss_probs_alt")
    if alt is not None:  # the same ensemble with the calibration the checkpoint did not choose
        metrics["multimodal_alt_calibration"] = _block(d, {**mm, "edss_probs": alt}, n)
    return metrics, outs


def evaluate_patient(model: Path | None, data: Path, report: Path, *, train_data: Path | None = None,
                     baseline_dir: Path | None = None, n_boot: int = 1000, gradcam_cases: int = 3) -> dict[str, Any]:
    """Write ``report/metrics.json``, ``report/report.md`` and figures; returns the metrics."""
    report.mkdir(parents=True, exist_ok=True)
    ck = checkpoint.load(model)
    d, raw = load_data(data)
    mm = _outputs(ck, d)
    metrics: dict[str, Any] = {"model": {k: ck.meta.get(k) for k in ("model_name", "model_version", "preset",
                                                                       "training_data", "train_seconds")},
                               "n_test": len(d), "test_data": [str(p) for p in cache_files(data)]}
    base, outs = _baselines(d, raw, train_data, baseline_dir, mm, n_boot)
    metrics["models"] = base
    metrics["versus"] = _versus(d, mm, outs, n_boot)
    metrics["targets"] = _targets(metrics)
    metrics["edss_ece_uncalibrated"] = bootstrap(ece_multi, d.edss_class.astype(float), mm["edss_probs_raw"], n=n_boot)
    metrics["ablation"] = {k: _block(d, _outputs(ck, d, v), max(200, n_boot // 5)) for k, v in ABLATIONS.items()}
    qsm = d.present[:, 0] > 0
    rim_lesion = np.expm1(d.lesion[:, RIM_FEATURE])
    metrics["rim_count_mae"] = {
        "head": bootstrap(lambda y, p: float(np.mean(np.abs(y - np.round(p)))), d.n_rim[qsm], mm["rim"][qsm], n=n_boot),
        "lesion_model": bootstrap(lambda y, p: float(np.mean(np.abs(y - p))), d.n_rim[qsm], rim_lesion[qsm], n=n_boot)}
    metrics["edss_class_counts_test"] = np.bincount(d.edss_class, minlength=4).tolist()
    figs = figures.make_all(report, d, mm, outs, metrics)
    seed = int(np.load(cache_files(data)[0])["seed"])
    figs += figures.gradcam_overlays(report, model, seed, [int(i) for i in d.index[:gradcam_cases]])
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (report / "report.md").write_text(figures.markdown(metrics, figs), encoding="utf-8")
    return metrics
