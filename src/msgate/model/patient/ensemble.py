"""Cross-fitted ensembles of the patient network, calibrated on out-of-fold predictions.

Patients (``Data.group``) are dealt into ``folds`` folds. Member ``k`` trains on every fold but ``k``
and early-stops on fold ``k``; its predictions on fold ``k`` are out-of-fold (OOF). With
``members == folds`` every training patient has one OOF prediction, so the temperature (and, with
``calibration="temperature+prior"``, a per-bin offset) is fitted on all N patients instead of a 20 %
split; ``members < folds`` uses the validation folds that were trained. The ensemble averages the
members' logits, as ``predict`` does. A fitted per-bin offset ``b`` is folded into the bias of each
member's EDSS rows (``T * b``), so ``softmax(mean logits / T)`` stays the whole calibration: the HE path,
``predict`` and the explanations need no change.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from msgate.model.patient import checkpoint
from msgate.model.patient.calibration import fit_temperature, fit_temperature_bias, softmax
from msgate.model.patient.ehr import EhrScaler
from msgate.model.patient.metrics import ece_multi, edss_bal_acc
from msgate.model.patient.network import Mode, PatientNet
from msgate.model.patient.presets import get_preset
from msgate.model.patient.train import Data, fit, infer, split

N_BINS = 4


@dataclass(frozen=True)
class Recipe:
    """Training choices beyond the network size (recorded in the checkpoint)."""

    members: int = 1
    folds: int = 5  # members <= folds; member k validates on fold k
    head: str = "quadratic"  # free | ordinal | quadratic (see fusion.OrdinalGatedFusion)
    class_weight: str = "balanced"  # balanced | sqrt | none
    calibration: str = "temperature"  # temperature | temperature+prior
    split_seed: int = 0
    epochs: int | None = None  # override the preset's maximum epochs


def fold_of(groups: NDArray[np.int64], folds: int, seed: int) -> NDArray[np.int64]:
    """Fold of each row; whole patients (groups) per fold, fold sizes within one patient."""
    uniq = np.unique(groups)
    perm = np.random.default_rng(seed).permutation(len(uniq))
    fold_of_group = np.empty(len(uniq), np.int64)
    fold_of_group[perm] = np.arange(len(uniq)) % folds
    return fold_of_group[np.searchsorted(uniq, groups)]  # type: ignore[no-any-return]


def _fold_split(data: Data, recipe: Recipe, k: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    if recipe.members == 1 and recipe.folds <= 1:
        return split(len(data), 0.2, recipe.split_seed, data.group)
    fold = fold_of(data.group, recipe.folds, recipe.split_seed)
    return np.flatnonzero(fold != k), np.flatnonzero(fold == k)


def train_members(data: Data, preset_name: str, recipe: Recipe, mode: Mode = "multimodal",
                  base: checkpoint.PatientCheckpoint | None = None) -> dict[str, Any]:
    """Train the members; returns nets, scaler, OOF outputs (rows ``oof_idx``) and per-member info."""
    preset = get_preset(preset_name) if base is None else checkpoint.preset_from_meta(base.meta)
    if recipe.epochs is not None:
        preset = replace(preset, epochs=recipe.epochs)
    scaler = base.scaler if base is not None else EhrScaler.fit(data.ehr_x, data.ehr_m)  # label-free
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nets: list[PatientNet] = []
    oof: dict[str, list[NDArray[np.float32]]] = {}
    oof_idx: list[NDArray[np.int64]] = []
    info: list[dict[str, Any]] = []
    for k in range(recipe.members):
        tr, va = _fold_split(data, recipe, k)
        init = None if base is None else base.nets[k % len(base.nets)].state_dict()
        net, hist = fit(preset, data.subset(tr), data.subset(va), scaler, mode, k, device, label=f"member {k}",
                        init=init, head="free" if base is not None else recipe.head,
                        class_weight=recipe.class_weight)
        nets.append(net.cpu())
        out = infer(net, data.subset(va), scaler, torch.device("cpu"))
        for key, v in out.items():
            oof.setdefault(key, []).append(v)
        oof_idx.append(va)
        info.append({"n_train": len(tr), "n_val": len(va), "epochs_run": len(hist["history"]),
                     "best_val_loss": round(float(hist["best_val_loss"]), 4), "train_seconds": hist["train_seconds"]})
    return {"nets": nets, "scaler": scaler, "preset": preset, "info": info, "oof_idx": np.concatenate(oof_idx),
            "oof": {k: np.concatenate(v) for k, v in oof.items()}, "device": device.type}


def _fold_prior(nets: list[PatientNet], t: float, offset: NDArray[np.float64]) -> None:
    """Add ``t * offset`` to the EDSS rows' bias of every member: ``softmax(mean / t)`` then includes it."""
    with torch.no_grad():
        for net in nets:
            net.fusion.image_head.bias[:N_BINS] += torch.as_tensor(t * offset, dtype=torch.float32)


def calibrate(run: dict[str, Any], data: Data, recipe: Recipe,
              base: checkpoint.PatientCheckpoint | None = None) -> dict[str, Any]:
    """Fit the calibration on the OOF outputs (folding a prior offset into the nets); OOF metrics. The
    calibration not chosen is recorded too (``alternative_calibration``, relative to the shipped logits)
    so the evaluation can show the balanced-accuracy / calibration trade-off of both."""
    idx, oof = run["oof_idx"], run["oof"]
    y = data.edss_class[idx]
    t_prior, prior = fit_temperature_bias(oof["edss_logits"], y)
    t_plain = fit_temperature(oof["edss_logits"], y)
    if recipe.calibration == "temperature+prior":
        undo = -t_prior * prior / t_plain  # the shipped logits carry t_prior * prior
        t_edss, offset = t_prior, prior
        alt = {"temperature_edss": t_plain, "edss_prior_offset": [round(float(v), 4) for v in undo]}
        _fold_prior(run["nets"], t_edss, offset)
    else:
        t_edss, offset = t_plain, np.zeros(N_BINS)
        alt = {"temperature_edss": t_prior, "edss_prior_offset": [round(float(v), 4) for v in prior]}
    ms = data.ms[idx]
    has_ms = np.isfinite(ms)
    t_ms = (fit_temperature(oof["ms_logit"][has_ms], ms[has_ms], binary=True) if has_ms.sum() >= 2
            else (base.t_ms if base is not None else 1.0))
    probs = softmax(oof["edss_logits"] / t_edss + offset)
    return {"temperature_edss": t_edss, "temperature_ms": t_ms, "edss_prior_offset": [round(float(v), 4) for v in offset],
            "calibration_rows": int(len(idx)), "alternative_calibration": alt,
            "oof_single_member": {"edss_balanced_accuracy": round(edss_bal_acc(y.astype(float), probs), 4),
                                  "edss_ece": round(ece_multi(y.astype(float), probs), 4)}}


def train_and_save(data: Data, preset_name: str, out: Path, recipe: Recipe, *, mode: Mode = "multimodal",
                   data_note: str, lesion_source: str, base: checkpoint.PatientCheckpoint | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, calibrate and write the checkpoint (+ JSON sidecar); returns its metadata."""
    t0 = time.time()
    run = train_members(data, preset_name, recipe, mode, base)
    cal = calibrate(run, data, recipe, base)
    info = run["info"]
    meta = {"preset": run["preset"].name, "preset_config": run["preset"].to_dict(), "seed": recipe.split_seed,
            "init_seed": list(range(recipe.members)), **cal, "recipe": asdict(recipe), "training_data": data_note,
            "n_patients": int(len(np.unique(data.group))), "n_train": info[0]["n_train"], "n_val": info[0]["n_val"],
            "lesion_source": lesion_source, "members": info, "epochs_run": [m["epochs_run"] for m in info],
            "train_seconds": round(sum(float(m["train_seconds"]) for m in info), 1),
            "wall_seconds": round(time.time() - t0, 1), "device": run["device"], **(extra or {})}
    if base is not None:
        meta["base_model"] = {k: base.meta.get(k) for k in ("model_name", "model_version", "training_data")}
    checkpoint.save(out, run["nets"], run["scaler"], meta)
    return meta
