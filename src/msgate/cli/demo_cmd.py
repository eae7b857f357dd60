"""``msgate demo``: the whole system, end to end, on a fresh machine (no Redis or PostgreSQL needed).

Starts msgate on the embedded defaults in a temporary home, a PACS and an interface engine to stand in
for the hospital's, makes three synthetic patients (MS with rims, MS without rims, cSVD; ``--patients``
takes the first N), sends their
HL7 over MLLP and their MRI over C-STORE to the real ports, shows progress live, prints each
patient's result as received back by the stand-ins, and writes key images and summary.html. With
``--he`` the EHR branch runs under CKKS and each result says so (SR algorithm parameters, ORU NTE).
Exit code 0 only if every SR and ORU was acknowledged (and, with ``--he``, both say HE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def command(
    out: Annotated[Path, typer.Option("--out", help="output folder: key images, summary.html, logs")] = Path("demo-out"),
    he: Annotated[bool, typer.Option("--he", help="EHR features under homomorphic encryption")] = False,
    patients: Annotated[int, typer.Option("--patients", min=1, max=3, help="how many of the three patients "
                                          "(MS with rims, MS without rims, cSVD) to send")] = 3,
    timeout: Annotated[float, typer.Option(help="seconds to wait for every SR and ORU")] = 900.0,
    keep_home: Annotated[bool, typer.Option("--keep-home", help="keep the temporary MSGATE_HOME")] = False,
    home_dir: Annotated[Path | None, typer.Option("--home", help="use this (new) MSGATE_HOME and keep it")] = None,
) -> None:
    """Run the whole system end to end on three synthetic patients and show the results."""
    from msgate.demo.console import run  # the synthetic cohort's imports (scipy, the generator) only for the demo

    raise typer.Exit(0 if run(out, he, patients, timeout, keep_home, home_dir) else 1)
