"""``msgate synth``: write a synthetic MS / cSVD cohort as DICOM + HL7 files."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Synthetic MS / cSVD cohort: DICOM studies, HL7 messages, masks, labels.jsonl.")


def parse_mix(text: str) -> dict[str, float]:
    """Parse 'ms=0.7,csvd=0.3' into a dict of non-negative weights."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = part.partition("=")
        if not sep or key.strip() not in ("ms", "csvd"):
            raise typer.BadParameter(f"expected ms=W,csvd=W, got {part!r}")
        try:
            mix[key.strip()] = float(val)
        except ValueError as exc:
            raise typer.BadParameter(f"weight of {key.strip()!r} is not a number") from exc
    if not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise typer.BadParameter("weights must be non-negative and not all zero")
    return mix


@app.callback(invoke_without_command=True)
def synth(
    out: Path = typer.Option(..., "--out", help="output directory"),
    patients: int = typer.Option(10, "--patients", min=1, help="number of subjects"),
    seed: int = typer.Option(0, "--seed", help="random seed; same seed, same bytes"),
    mix: str = typer.Option("ms=0.7,csvd=0.3", "--mix", help="diagnosis weights"),
    ts: str = typer.Option("explicit", "--ts", help="transfer syntax: explicit | j2k | rle"),
    missing_rate: float = typer.Option(0.1, "--missing-rate", min=0.0, max=1.0, help="base EHR missingness"),
    protocol: str = typer.Option("mixed", "--protocol", help="3d | 2d | mixed"),
    resolution: int = typer.Option(1, "--resolution", help="template grid in mm: 1 or 2"),
    enhanced: bool = typer.Option(False, "--enhanced", help="write multi-frame Enhanced MR objects"),
    workers: int = typer.Option(1, "--workers", min=1, help="parallel processes"),
) -> None:
    """Generate the cohort and print where it went."""
    from msgate.model.synth.cohort import generate_cohort

    if ts not in ("explicit", "j2k", "rle"):
        raise typer.BadParameter("--ts must be explicit, j2k or rle")
    if protocol not in ("3d", "2d", "mixed"):
        raise typer.BadParameter("--protocol must be 3d, 2d or mixed")
    if resolution not in (1, 2):
        raise typer.BadParameter("--resolution must be 1 or 2")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("synthetic subjects"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("synth", total=patients)
        records = generate_cohort(out, patients, seed=seed, mix=parse_mix(mix), ts=ts, missing_rate=missing_rate,
                                  protocol=protocol, resolution=resolution, enhanced=enhanced, workers=workers,
                                  progress=lambda: bar.advance(task))
    n_ms = sum(r["diagnosis"] == "ms" for r in records)
    typer.echo(f"wrote {len(records)} subjects ({n_ms} MS, {len(records) - n_ms} cSVD) to {out}")
