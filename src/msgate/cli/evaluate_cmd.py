"""``msgate evaluate``: evaluation reports (metrics.json, Markdown, PNG figures)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Evaluate models on held-out synthetic subjects.", no_args_is_help=True)


@app.callback(invoke_without_command=True)
def evaluate(
    ctx: typer.Context,
    he: bool = typer.Option(False, "--he", help="homomorphic path vs plaintext ensemble on held-out cases"),
    model: Path | None = typer.Option(None, "--model", help="--he: patient checkpoint (default: the shipped one)"),
    data: Path | None = typer.Option(None, "--data", help="--he: held-out cohort cache (.npz) instead of --synthetic"),
    synthetic: int = typer.Option(200, "--synthetic", min=1, help="--he: held-out synthetic subjects (simulated MRI)"),
    seed: int = typer.Option(202, "--seed", help="--he: cohort seed of the held-out subjects (unseen in training)"),
    generator: bool = typer.Option(False, "--ehr-generator", help="--he: EHR from the cohort generator and "
                                   "noise-image embeddings instead of simulated MRI (seconds instead of minutes)"),
    batch: int = typer.Option(16, "--batch", min=1, help="--he: cases per CKKS pack"),
    report: Path = typer.Option(Path("var/reports/he"), "--report", help="--he: output folder"),
    cache_dir: Path = typer.Option(Path("var/cache/patient"), "--cache-dir", help="--he: where the cache is built"),
) -> None:
    """Evaluation commands, one per model; ``--he`` runs the held-out synthetic test set through the
    plaintext ensemble and the CKKS path and reports the equivalence (exit 1 if it fails)."""
    if ctx.invoked_subcommand is not None:
        if he:
            raise typer.BadParameter("--he is a run of its own; give it without a subcommand")
        return
    if not he:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    from msgate.model.he import equivalence

    if data is None and not generator:
        typer.echo(f"building the held-out cohort (seed {seed}, {synthetic} subjects) in {cache_dir} ...")
        data = equivalence.held_out_cache(cache_dir=cache_dir, seed=seed, n=synthetic, checkpoint=model)
    res = equivalence.compare(checkpoint=model, n=None if data is not None else synthetic, batch=batch, data=data,
                              seed=seed)
    path = equivalence.write_report(res, report)
    typer.echo(f"HE vs plaintext ({res['members']} members, {res['cases']} cases, packs of {batch}): same class "
               f"{100 * res['same_class']:.1f} %, max |dp| EDSS {res['max_abs_dprob_edss']:.1e}, "
               f"MS {res['max_abs_dprob_ms']:.1e} (limit 1e-3), {res['seconds']:.1f} s  -> {path}")
    raise typer.Exit(0 if equivalence.passed(res) else 1)


@app.command("lesions")
def lesions(
    model: Path | None = typer.Option(None, "--model", help="checkpoint (default: the shipped lesions-tiny.pt)"),
    synthetic: int = typer.Option(200, "--synthetic", min=1, help="held-out synthetic subjects"),
    seed: int = typer.Option(1000, "--seed", help="cohort seed of the held-out subjects (unseen in training)"),
    data: Path | None = typer.Option(None, "--data", help="a `msgate synth` folder (DICOM + masks + labels.jsonl)"),
    protocol: str = typer.Option("3d", "--protocol", help="synthetic protocol: 3d | 2d | mixed"),
    report: Path = typer.Option(Path("var/reports/lesions"), "--report", help="output folder"),
    n_boot: int = typer.Option(1000, "--bootstrap", min=10, help="bootstrap resamples"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads"),
) -> None:
    """Dice and lesion-wise F1 by size, Rim+ ROC/PR, ablations, example patches, 95 % bootstrap intervals."""
    import torch

    from msgate.model.lesions.evaluate import run_evaluation
    from msgate.model.lesions.model import load_lesion_model

    if protocol not in ("3d", "2d", "mixed"):
        raise typer.BadParameter("--protocol must be 3d, 2d or mixed")
    torch.set_num_threads(threads)
    m = load_lesion_model(model)
    doc = run_evaluation(m, seed=seed, subjects=synthetic, out_dir=report, protocol=protocol, n_boot=n_boot,
                         threads=threads, data=data)
    met = doc["metrics"]
    typer.echo(f"Dice {met['dice_mean']['value']:.3f}  F1>=3mm {met['f1 >=3 mm']['value']:.3f}  "
               f"Rim+ ROC-AUC {met.get('roc_auc asymmetric', {}).get('value', float('nan')):.3f}  "
               f"PR-AUC {met.get('pr_auc asymmetric', {}).get('value', float('nan')):.3f}  -> {report / 'report.md'}")


@app.command("patient")
def patient(
    model: Path | None = typer.Option(None, "--model", help="checkpoint (default: the shipped patient-tiny.pt)"),
    data: Path | None = typer.Option(None, "--data", help="held-out cache file or folder (*.npz)"),
    synthetic: int | None = typer.Option(None, "--synthetic", min=10, help="simulate N held-out subjects instead"),
    seed: int = typer.Option(202, "--seed", help="cohort seed for --synthetic (never used in training)"),
    train_data: Path | None = typer.Option(None, "--train-data", help="training cache (random-forest and reference baselines)"),
    baselines: Path | None = typer.Option(None, "--baselines", help="folder with patient-image.pt / patient-ehr.pt"),
    report: Path = typer.Option(Path("var/reports/patient"), "--report", help="output folder"),
    n_boot: int = typer.Option(1000, "--bootstrap", min=10, help="bootstrap resamples"),
    cache_dir: Path = typer.Option(Path("var/cache/patient"), "--cache-dir", help="where --synthetic writes arrays"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads"),
) -> None:
    """metrics.json + report.md: ROC, confusion, reliability/ECE, EDSS scatter, ablation, Grad-CAM, baselines."""
    import torch

    from msgate.model.patient import checkpoint
    from msgate.model.patient.evaluate import evaluate_patient
    from msgate.model.patient.synthdata import build_chunks

    if (synthetic is None) == (data is None):
        raise typer.BadParameter("give exactly one of --data PATH or --synthetic N")
    torch.set_num_threads(threads)
    if synthetic is not None:
        meta = checkpoint.load(model).meta  # the held-out cases go through the model's own lesion source
        data = build_chunks(cache_dir / f"s{seed}", seed, synthetic, str(meta["preset"]),
                            lesion_kind=str(meta.get("lesion_source", "auto")))
    assert data is not None
    met = evaluate_patient(model, data, report, train_data=train_data, baseline_dir=baselines, n_boot=n_boot)
    mm = met["models"]["multimodal"]
    typer.echo(f"EDSS bal. acc {mm['edss_balanced_accuracy']['value']:.3f}  MAE {mm['edss_mae']['value']:.2f}  "
               f"MS AUC {mm['ms_auc']['value']:.3f}  ECE {mm['edss_ece']['value']:.3f}  -> {report / 'report.md'}")
