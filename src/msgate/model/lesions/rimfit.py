"""Rim+ classifiers with training code 0.2.0 inside a lesion model: data, training, Rim+-only retraining.

Training code 0.2.0 differs from 0.1.0 (``train.py``, the shipped checkpoint) only in the Rim+ part: the
``rimtrain`` recipe (bounded FiLM, label-blind pretraining on an extra unlabelled pool, pretrained stacked
nets use SimCLR) with the settings of :func:`presets.with_rim_recipe`. It is chosen explicitly
(``msgate train lesions --rim-recipe 0.2.0``); the default stays 0.1.0. The nets are the ones
``bench/rim_ablation.py run --seeds <seed>`` trains on the same data.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from msgate.model.lesions.ablation import PatchSet, simulate_set
from msgate.model.lesions.model import LesionModel, build_model
from msgate.model.lesions.presets import Preset
from msgate.model.lesions.rimtrain import VARIANTS as RIM_VARIANTS
from msgate.model.lesions.rimtrain import RimRecipe, train_variant
from msgate.model.lesions.train import Logger, fit_seg_and_location, make_cohort, rim_set

VERSION = "0.2.0"
VARIANTS = ("asymmetric", "asymmetric_nopretrain", "stacked")  # shipped; "asymmetric" is the one used
RIM_FIELDS = ("rim_patch", "rim_widths", "rim_subjects", "rim_enrich", "rim_batch", "pretrain_epochs",
              "finetune_epochs", "rim_pool_subjects")
_MIX = {"ms": 0.85, "csvd": 0.15}


def _rim_log(log: Logger, task: Any, name: str) -> Callable[[str, int, float], None]:
    def rec(stage: str, epoch: int, loss: float) -> None:
        log.log(f"rim_{name}_{stage}", epoch=epoch, loss=round(loss, 5))
        log.progress.update(task, advance=1, info=f"{stage} {epoch} loss {loss:.3f}")
    return rec


def rim_sets(preset: Preset, seed: int, log: Logger, data: Path | None) -> tuple[PatchSet, PatchSet | None]:
    """Labelled Rim+ patches (cohort ``seed``, Rim+ enriched) and the unlabelled pretraining pool.

    The pool is ``preset.rim_pool_subjects`` further subjects of the same cohort at natural prevalence;
    their Rim+ flags are never read. With ``data`` (a ``msgate synth`` folder) the labelled set is its first
    ``rim_subjects`` subjects and there is no extra pool.
    """
    if data is not None:
        co = make_cohort(preset, seed, preset.rim_subjects, log, "simulate (rim)", data=data)
        x, y, subj = rim_set(co, preset.rim_patch)
        vox = np.zeros(len(y), np.int32)
        return PatchSet(x.astype(np.float16), y.astype(np.int8), subj.astype(np.int32), vox), None

    def tracker(desc: str, n: int) -> Callable[[int, int], None]:
        task = log.progress.add_task(desc, total=n, info="")
        return lambda i, _n: log.progress.update(task, completed=i)

    labelled = simulate_set(preset, seed, 1, preset.rim_subjects, rim_enrich=preset.rim_enrich, mix=_MIX,
                            progress=tracker("simulate (rim)", preset.rim_subjects))
    pool = None
    if preset.rim_pool_subjects:
        pool = simulate_set(preset, seed, preset.rim_subjects + 1, preset.rim_pool_subjects, mix=_MIX,
                            progress=tracker("simulate (rim pool)", preset.rim_pool_subjects))
    return labelled, pool


def train_rims(model: LesionModel, seed: int, log: Logger, data: Path | None = None,
               variants: tuple[str, ...] = VARIANTS) -> None:
    """Train the Rim+ variants (``rimtrain`` recipe, network seed ``seed``) on cohort ``seed + 1``.

    Sets ``model.rim`` and its metadata; the segmenter and location parts are not touched.
    """
    preset = model.preset
    labelled, pool = rim_sets(preset, seed + 1, log, data)
    log.log("rim_data", n=len(labelled.y), n_pos=int(labelled.y.sum()), pool=0 if pool is None else len(pool.y))
    recipe = RimRecipe(pretrain_epochs=preset.pretrain_epochs, finetune_epochs=preset.finetune_epochs,
                       batch=preset.rim_batch)
    for name in variants:
        pre = RIM_VARIANTS[name][1]
        total = recipe.finetune_epochs + (recipe.pretrain_epochs if pre else 0)
        task = log.progress.add_task(f"rim {name}", total=total, info="")
        net = train_variant(name, preset, labelled, pool, seed, recipe, _rim_log(log, task, name))
        model.rim[name] = net.to(model.device).eval()
    model.meta["rim_archs"] = {n: RIM_VARIANTS[n][0] for n in variants}
    model.meta["rim_train_lesions"] = {"n": len(labelled.y), "rim_positive": int(labelled.y.sum()),
                                       "pool_unlabelled": 0 if pool is None else len(pool.y)}
    model.meta["rim_recipe"] = dict(vars(recipe))


def _seg_desc(preset: Preset, seed: int, data: Path | None) -> str:
    if data is not None:
        return f"msgate synth folder {data.name}: first {preset.seg_subjects} subjects (segmenter)"
    return (f"synthetic cohort (msgate.model.synth), {preset.synth_resolution} mm template, 3D protocol: "
            f"segmenter/location seed {seed}, subjects 1-{preset.seg_subjects}, mix ms=0.7 csvd=0.3")


def _rim_desc(preset: Preset, seed: int, data: Path | None) -> str:
    if data is not None:
        return f"Rim+: first {preset.rim_subjects} subjects of {data.name} (no extra pretraining pool)"
    return (f"Rim+ seed {seed + 1}, subjects 1-{preset.rim_subjects}, mix ms=0.85 csvd=0.15, MS Rim+ probability "
            f"enriched to {preset.rim_enrich}; unlabelled pretraining pool: subjects {preset.rim_subjects + 1}-"
            f"{preset.rim_subjects + preset.rim_pool_subjects} of seed {seed + 1}, natural prevalence")


def train_lesion_model_020(preset: Preset, seed: int, log_path: Path | None = None, quiet: bool = False,
                           device: str = "cpu", data: Path | None = None) -> LesionModel:
    """``train.train_lesion_model`` with the 0.2.0 Rim+ part; ``preset`` already carries the 0.2.0 Rim+ settings."""
    log = Logger(log_path, quiet)
    t0 = time.time()
    meta = {"version": VERSION, "preset": preset.name, "seed": seed,
            "training_data": f"{_seg_desc(preset, seed, data)}; {_rim_desc(preset, seed, data)}",
            "intended_use": "research and integration testing only; not for clinical use",
            "rim_archs": {n: RIM_VARIANTS[n][0] for n in VARIANTS}}
    model = build_model(preset, meta, VARIANTS, device)
    with log.progress:
        acc = fit_seg_and_location(model, seed, log, data)
        t_rim = time.time()
        train_rims(model, seed, log, data)
    model.meta["rim_train_seconds"] = round(time.time() - t_rim, 1)
    model.meta["train_seconds"] = round(time.time() - t0, 1)
    model.meta["location_train_accuracy"] = round(acc, 4)
    log.log("done", seconds=model.meta["train_seconds"])
    for m in (model.seg, model.loc, *model.rim.values()):
        m.eval()
    return model


def retrain_rims(model: LesionModel, preset: Preset, seed: int, log_path: Path | None = None, quiet: bool = False,
                 data: Path | None = None) -> LesionModel:
    """Retrain only the Rim+ classifiers of ``model`` with code 0.2.0 and ``preset``'s Rim+ settings; the
    segmenter, location model and their settings stay exactly as they are (their weights are not touched)."""
    log = Logger(log_path, quiet)
    t0 = time.time()
    model.preset = dataclasses.replace(model.preset, **{f: getattr(preset, f) for f in RIM_FIELDS})
    old = str(model.meta.get("training_data", ""))
    seg_part = old.split("; Rim+")[0]
    retrained = (f"Rim+ classifiers only; segmenter and location model unchanged from the checkpoint of version "
                 f"{model.meta.get('version')} (seed {model.meta.get('seed')})")
    model.rim = {}
    with log.progress:
        train_rims(model, seed, log, data)
    model.meta.update({"version": VERSION, "rim_seed": seed, "rim_train_seconds": round(time.time() - t0, 1),
                       "training_data": f"{seg_part}; {_rim_desc(model.preset, seed, data)}", "retrained": retrained})
    log.log("done", seconds=model.meta["rim_train_seconds"])
    return model
