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
    data: Path | None = typer.Option(None, "--data", help="not supported yet: train from a `msgate synth` folder"),
    seed: int = typer.Option(0, "--seed", help="cohort seed (segmenter: seed, Rim+: seed + 1)"),
    out: Path = typer.Option(Path("var/models/lesions-tiny.pt"), "--out", help="checkpoint path (+ .json sidecar)"),
    log: Path | None = typer.Option(None, "--log", help="metrics JSONL (default: <out>.metrics.jsonl)"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads"),
) -> None:
    """Train the lesion segmenter, location classifier and Rim+ classifiers; write one checkpoint."""
    import torch

    from msgate.model.lesions.model import save_lesion_model
    from msgate.model.lesions.presets import get_preset
    from msgate.model.lesions.train import train_lesion_model

    if data is not None:
        raise typer.BadParameter("--data is not supported yet; use --synthetic N (in-memory cohort)")
    torch.set_num_threads(threads)
    p = get_preset(preset)
    if synthetic is not None:
        p = dataclasses.replace(p, seg_subjects=synthetic)
    if rim_synthetic is not None:
        p = dataclasses.replace(p, rim_subjects=rim_synthetic)
    log_path = log or out.with_suffix(".metrics.jsonl")
    model = train_lesion_model(p, seed, log_path, device=device)
    save_lesion_model(model, out)
    typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {model.meta['train_seconds']:.0f} s; log {log_path}")
