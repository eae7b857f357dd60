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
) -> None:
    """Train the lesion segmenter, location classifier and Rim+ classifiers; write one checkpoint."""
    import torch

    from msgate.model.lesions.model import save_lesion_model
    from msgate.model.lesions.presets import get_preset
    from msgate.model.lesions.train import train_lesion_model

    torch.set_num_threads(threads)
    p = get_preset(preset)
    if synthetic is not None:
        p = dataclasses.replace(p, seg_subjects=synthetic)
    if rim_synthetic is not None:
        p = dataclasses.replace(p, rim_subjects=rim_synthetic)
    out = out or Path(f"var/models/lesions-{p.name}.pt")
    log_path = log or out.with_suffix(".metrics.jsonl")
    model = train_lesion_model(p, seed, log_path, device=device, data=data)
    save_lesion_model(model, out)
    typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {model.meta['train_seconds']:.0f} s; log {log_path}")


@app.command("patient")
def patient(
    preset: str = typer.Option("tiny", "--preset", help="tiny (CPU) | full (GPU)"),
    synthetic: int | None = typer.Option(None, "--synthetic", min=10, help="simulate N subjects (in memory) and train"),
    data: Path | None = typer.Option(None, "--data", help="cache file or folder of *.npz written by --synthetic"),
    seed: int = typer.Option(101, "--seed", help="cohort seed for --synthetic (keep it apart from evaluation seeds)"),
    mode: str = typer.Option("multimodal", "--mode", help="multimodal | image | ehr (the last two are baselines)"),
    out: Path = typer.Option(Path("var/models/patient-tiny.pt"), "--out", help="checkpoint path (+ .json sidecar)"),
    cache_dir: Path = typer.Option(Path("var/cache/patient"), "--cache-dir", help="where --synthetic writes arrays"),
    lesions: str = typer.Option("auto", "--lesions", help="lesion source: auto | heuristic | lesion-model"),
    workers: int = typer.Option(1, "--workers", min=1, help="processes simulating subjects"),
    members: int = typer.Option(1, "--members", min=1, help="ensemble size (init seeds 0..K-1, logits averaged)"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads"),
) -> None:
    """Train the patient model (EDSS, MS vs cSVD, Rim+ count) with patient-level splits and calibration."""
    import torch

    from msgate.model.patient.synthdata import build_cache
    from msgate.model.patient.train import build_ensemble, train_patient

    if (synthetic is None) == (data is None):
        raise typer.BadParameter("give exactly one of --synthetic N or --data PATH")
    if mode not in ("multimodal", "image", "ehr"):
        raise typer.BadParameter("--mode must be multimodal, image or ehr")
    torch.set_num_threads(threads)
    if synthetic is not None:
        data = build_cache(cache_dir / f"train-s{seed}-n{synthetic}-{preset}.npz", seed, synthetic, preset,
                           workers=workers, lesion_kind=lesions)
    assert data is not None
    if members == 1:
        meta = train_patient(data, preset, out, mode=mode)  # type: ignore[arg-type]
    else:
        parts = [out.with_name(f"{out.stem}-m{i}.pt") for i in range(members)]
        for i, part in enumerate(parts):
            train_patient(data, preset, part, mode=mode, init_seed=i)  # type: ignore[arg-type]
        meta = build_ensemble(parts, data, out)
    typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {meta['n_train']} train / {meta['n_val']} val, "
               f"{meta['epochs_run']} epochs in {meta['train_seconds']:.0f} s, T_edss {meta['temperature_edss']:.2f}")
