"""``msgate rules test FILE...``: what the series-role and routing rules decide for given DICOM files.

Reads each file's header only (no pixel data), applies the configured ``[rules]`` section, and prints
the role, the route and the rules that decided them, with the scanning sequence and inversion time the rules
read (for Enhanced MR, from its functional groups). Nothing is stored; file contents are not logged.

A route's awaited roles (``await_roles``) are shown with whether each is present among the files given
for the same study (StudyInstanceUID): give every series of a study to see whether its release would be
held for the quiet period. Present means a file whose series role is that role, as the listener counts
it (``rules.awaited_absent``: QSM magnitude/phase sources are not a QSM).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any

import typer
from pydicom import dcmread
from rich.table import Table

from msgate.cli.common import add_row, cell, console, print_json, state
from msgate.listener import rules

app = typer.Typer(no_args_is_help=True)


@app.command()
def test(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="DICOM files", exists=True, dir_okay=False)],
    calling_aet: Annotated[str, typer.Option("--calling-aet", help="as if sent by this AE")] = "",
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the role and route the rules give each file."""
    cfg = state(ctx).settings.rules
    docs: list[dict[str, Any]] = []
    decided: list[tuple[dict[str, Any], rules.Decision, str]] = []
    study_roles: dict[str, set[str]] = defaultdict(set)  # by StudyInstanceUID (kept in memory, never shown)
    failed = False
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True, force=True)
            decision = rules.decide(ds, cfg, calling_aet)
        except Exception as exc:  # one unreadable file must not hide the others
            failed = True
            docs.append({"file": str(path), "error": type(exc).__name__})
            continue
        study = str(ds.get("StudyInstanceUID", ""))
        study_roles[study].add(decision.role.value)
        fields = rules.series_fields(ds)  # what the role rules read (Enhanced MR: from its functional groups)
        doc = {"file": str(path), "role": decision.role.value, "role_rule": decision.role_rule,
               "route": decision.route, "route_rule": decision.route_rule,
               "required_roles": [r.value for r in decision.required_roles],
               "scanning_sequence": fields.scanning_sequence, "inversion_time": fields.inversion_time,
               "inversion_count": fields.inversion_count}
        docs.append(doc)
        decided.append((doc, decision, study))
    for doc, decision, study in decided:  # presence needs every file of the study read first
        doc["await_roles"] = [r.value for r in decision.await_roles]
        doc["awaited_absent"] = rules.awaited_absent(decision.await_roles, study_roles[study])
    if json_out:
        print_json(docs)
    else:
        table = Table("file", "role", "role rule", "sequence, TI", "route", "route rule", "required roles",
                      "awaited roles")
        for d in docs:
            if "error" in d:
                add_row(table, d["file"], cell("unreadable", style="red"), d["error"], "", "", "", "", "")
            else:
                add_row(table, d["file"], str(d["role"]), str(d["role_rule"]), _sequence(d), str(d["route"]),
                        str(d["route_rule"]), ",".join(d["required_roles"]), _awaited(d))
        console.print(table)
    if failed:
        raise typer.Exit(1)


def _awaited(doc: dict[str, Any]) -> str:
    """``QSM present`` / ``QSM absent`` per awaited role, as the study's files given here have them."""
    absent = set(doc["awaited_absent"])
    return ", ".join(f"{r} {'absent' if r in absent else 'present'}" for r in doc["await_roles"])


def _sequence(doc: dict[str, Any]) -> str:
    """``SE\\IR, TI 1800 ms`` (two inversion times: ``TI ×2``), as the role rules read them."""
    ti = (f"TI ×{doc['inversion_count']}" if doc["inversion_count"] >= 2
          else f"TI {doc['inversion_time']:g} ms" if doc["inversion_time"] is not None else "")
    return ", ".join(part for part in (doc["scanning_sequence"], ti) if part)
