"""``msgate train``: train models from scratch on the synthetic cohort."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

app = typer.Typer(help="Train models from scratch (synthetic cohort).", no_args_is_help=True)


@app.callback()
def train() -> None:
    """Training commands, one per model."""


@app.command("lesions")
def lesions(
    preset: str = typer.Option("tiny", "--preset", help="tiny (CPU, 2 mm) | full (GPU, 1 mm)"),
    synthetic: int | None = typer.Option(None, "--synthetic", min=1,
                                         help="subjects simulated for the segmenter (default: the preset's)"),
    rim_synthetic: int | None = typer.Option(None, "--rim-synthetic", min=1,
                                             help="subjects simulated for the Rim+ classifier (default: the preset's)"),
    data: Path | None = typer.Option(None, "--data", help="train on a `msgate synth` folder instead of simulating"),
    seed: int = typer.Option(0, "--seed", help="cohort seed (segmenter: seed, Rim+: seed + 1)"),
    out: Path | None = typer.Option(None, "--out", help="checkpoint path, + .json sidecar (default: var/models/lesions-<preset>.pt)"),
    log: Path | None = typer.Option(None, "--log", help="metrics JSONL (default: <out>.metrics.jsonl)"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads"),
    rim_recipe: str = typer.Option("0.2.0", "--rim-recipe", help="Rim+ training code: 0.2.0 (default, the shipped "
                                   "checkpoint's: bounded FiLM, unlabelled pretraining pool) | 0.1.0 (first release)"),
    rim_only: bool = typer.Option(False, "--rim-only", help="retrain only the Rim+ classifiers of --init (training "
                                  "code 0.2.0); its segmenter and location model are kept as they are"),
    init: Path | None = typer.Option(None, "--init", help="--rim-only: checkpoint to start from (default: shipped)"),
) -> None:
    """Train the lesion segmenter, location classifier and Rim+ classifiers; write one checkpoint."""
    import torch

    from msgate.model.lesions.model import save_lesion_model
    from msgate.model.lesions.presets import RIM_RECIPES, get_preset, with_rim_recipe
    from msgate.model.lesions.train import train_lesion_model

    if rim_recipe not in RIM_RECIPES:
        typer.echo(f"error: --rim-recipe must be one of {', '.join(RIM_RECIPES)}", err=True)
        raise typer.Exit(2)
    if rim_only and rim_recipe == "0.1.0":
        typer.echo("error: --rim-only retrains with training code 0.2.0 only; leave out --rim-recipe 0.1.0", err=True)
        raise typer.Exit(2)
    torch.set_num_threads(threads)
    p = get_preset(preset)
    if synthetic is not None:
        p = dataclasses.replace(p, seg_subjects=synthetic)
    if rim_synthetic is not None:
        p = dataclasses.replace(p, rim_subjects=rim_synthetic)
    out = out or Path(f"var/models/lesions-{p.name}.pt")
    log_path = log or out.with_suffix(".metrics.jsonl")
    if rim_only:
        from msgate.model.lesions.model import load_lesion_model
        from msgate.model.lesions.rimfit import retrain_rims

        model = retrain_rims(load_lesion_model(init, device=device), with_rim_recipe(p, rim_recipe), seed, log_path,
                             data=data)
        seconds = float(model.meta["rim_train_seconds"])
    else:
        model = train_lesion_model(p, seed, log_path, device=device, data=data, rim_recipe=rim_recipe)
        seconds = float(model.meta["train_seconds"])
    save_lesion_model(model, out)
    typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {seconds:.0f} s; log {log_path}")


@app.command("patient")
def patient(
    ctx: typer.Context,
    preset: str = typer.Option("tiny", "--preset", help="tiny (CPU) | full (GPU)"),
    synthetic: int | None = typer.Option(None, "--synthetic", min=10, help="simulate N subjects (in memory) and train"),
    data: Path | None = typer.Option(None, "--data", help="cache file or folder of *.npz written by --synthetic"),
    from_store: bool = typer.Option(False, "--from-store", help="train on the studies in msgate's store, EDSS "
                                    "labels from HL7 observations (code MS-EDSS); nothing decrypted is written"),
    init: str | None = typer.Option(None, "--init", help="--from-store: start from this checkpoint's weights and "
                                    "scaler (default: the shipped model; 'none': from scratch)"),
    seed: int = typer.Option(101, "--seed", help="cohort seed for --synthetic (keep it apart from evaluation seeds)"),
    mode: str = typer.Option("multimodal", "--mode", help="multimodal | image | ehr (the last two are baselines)"),
    out: Path = typer.Option(Path("var/models/patient-tiny.pt"), "--out", help="checkpoint path (+ .json sidecar)"),
    cache_dir: Path = typer.Option(Path("var/cache/patient"), "--cache-dir", help="where --synthetic writes arrays"),
    lesions: str = typer.Option("lesion-model", "--lesions", help="lesion source: lesion-model | heuristic | auto"),
    workers: int = typer.Option(2, "--workers", min=1, help="processes simulating subjects"),
    members: int | None = typer.Option(None, "--members", min=1, help="ensemble size; member k validates on fold k "
                                       "(default 5; --from-store: 1)"),
    folds: int = typer.Option(5, "--folds", min=2, help="patient folds (members <= folds)"),
    head: str = typer.Option("quadratic", "--head", help="EDSS bin head while training: quadratic | ordinal | free"),
    class_weight: str = typer.Option("balanced", "--class-weight", help="balanced | sqrt | none"),
    calibration: str = typer.Option("temperature", "--calibration", help="temperature | temperature+prior"),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="override the preset's maximum epochs"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads"),
) -> None:
    """Train the patient model (EDSS, MS vs cSVD, Rim+ count): a cross-fitted ensemble, patient-level
    folds, calibration on the out-of-fold predictions. The defaults reproduce the shipped checkpoint
    (``--synthetic 650``)."""
    import torch

    from msgate.model.patient.ensemble import Recipe

    members = members or (1 if from_store else 5)
    if sum(x is not None for x in (synthetic, data, True if from_store else None)) != 1:
        raise typer.BadParameter("give exactly one of --synthetic N, --data PATH or --from-store")
    if mode not in ("multimodal", "image", "ehr") or head not in ("quadratic", "ordinal", "free"):
        raise typer.BadParameter("--mode must be multimodal, image or ehr; --head quadratic, ordinal or free")
    if members > folds or class_weight not in ("balanced", "sqrt", "none") or \
            calibration not in ("temperature", "temperature+prior"):
        raise typer.BadParameter("need --members <= --folds, a known --class-weight and --calibration")
    torch.set_num_threads(threads)
    recipe = Recipe(members=members, folds=folds, head=head, class_weight=class_weight, calibration=calibration,
                    epochs=epochs)
    if from_store:
        meta = _from_store(ctx, preset, out, init, recipe, mode)
    else:
        meta = _synthetic(preset, out, recipe, mode, synthetic, data, seed, cache_dir, lesions, workers)
    typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {meta['n_patients']} patients, "
               f"{len(meta['members'])} member(s), epochs {meta['epochs_run']}, {meta['wall_seconds']:.0f} s training, "
               f"T_edss {meta['temperature_edss']:.2f}")


def _synthetic(preset: str, out: Path, recipe: object, mode: str, synthetic: int | None, data: Path | None,
               seed: int, cache_dir: Path, lesions: str, workers: int) -> dict[str, object]:
    """``--synthetic N`` (simulate into ``cache_dir``, resuming finished chunks) or ``--data``."""
    import time

    import numpy as np

    from msgate.model.patient.ensemble import train_and_save
    from msgate.model.patient.synthdata import build_chunks
    from msgate.model.patient.train import load_data, synthetic_note

    t0 = time.time()
    if synthetic is not None:
        data = build_chunks(cache_dir / f"s{seed}", seed, synthetic, preset, workers=workers, lesion_kind=lesions)
    assert data is not None
    sim_seconds = round(time.time() - t0, 1)
    dset, raw = load_data(data)
    if synthetic is not None:
        dset = dset.subset(np.flatnonzero(dset.index <= synthetic))
    note = synthetic_note(raw, len(dset), len(dset), 0).replace(" split by patient into", ";").split(";")[0]
    note += f"; {recipe.members} members on {recipe.folds} patient folds (member k validates on fold k)"  # type: ignore[attr-defined]
    return train_and_save(dset, preset, out, recipe, mode=mode, data_note=note,  # type: ignore[arg-type]
                          lesion_source=str(raw["lesion_source"]),
                          extra={"simulation_seconds": sim_seconds, "lesion_checkpoint": str(raw["lesion_checkpoint"]),
                                 "generator": str(raw["generator"]),
                                 "training_seeds": [int(s) for s in raw["seeds"]]})


def _from_store(ctx: typer.Context, preset: str, out: Path, init: str | None, recipe: object,
                mode: str) -> dict[str, object]:
    """``--from-store``: cases as the workers load them, EDSS from HL7, training in memory."""
    from msgate.cli.common import state
    from msgate.model.patient import checkpoint
    from msgate.model.patient.ensemble import train_and_save
    from msgate.model.patient.lesionsrc import load_lesion_source, source_kind
    from msgate.model.patient.presets import get_preset
    from msgate.model.patient.train import data_from_arrays
    from msgate.workers.training import collect

    base = None if init == "none" else checkpoint.load(init)
    kind = str(base.meta.get("lesion_source", "auto")) if base is not None else "auto"
    source = load_lesion_source(kind)
    grid = checkpoint.preset_from_meta(base.meta) if base is not None else get_preset(preset)
    arrays, skipped = collect(state(ctx).store(), grid, source)
    data = data_from_arrays(arrays)
    note = (f"msgate store: {len(data)} studies of {len(set(data.group.tolist()))} patients with an EDSS label "
            f"(HL7 MS-EDSS within 180 days of the scan), skipped {dict(skipped)}; MS/cSVD and Rim+ unlabelled"
            + (f"; fine-tuned from {base.meta.get('model_name')} {base.meta.get('model_version')}" if base else ""))
    return train_and_save(data, preset, out, recipe, mode=mode, data_note=note,  # type: ignore[arg-type]
                          lesion_source=source_kind(source), base=base)
