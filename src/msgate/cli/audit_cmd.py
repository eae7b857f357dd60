"""``msgate audit verify|tail``: check the hash chain and read recent events."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from msgate.cli.common import add_row, console, fail, print_json, state
from msgate.storage import audit

app = typer.Typer(no_args_is_help=True)


@app.command()
def verify(ctx: typer.Context, json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Verify the whole chain; exit 1 and name the first bad record if it was tampered with."""
    store = state(ctx).store()
    with store.db.session() as session:
        result = audit.verify(session)
    if json_out:
        print_json({"ok": result.ok, "checked": result.checked, "first_bad_seq": result.first_bad_seq,
                    "reason": result.reason})
        raise typer.Exit(0 if result.ok else 1)
    if not result.ok:
        fail(f"audit chain broken at record {result.first_bad_seq}: {result.reason}")
    console.print(f"audit chain intact: {result.checked} records")


@app.command()
def tail(
    ctx: typer.Context,
    n: Annotated[int, typer.Option("-n", min=1, help="how many events")] = 20,
    kind: Annotated[str | None, typer.Option("--kind", help="only events whose kind starts with this")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the most recent audit events."""
    store = state(ctx).store()
    with store.db.session() as session:
        events = audit.tail(session, n, kind)
    if json_out:
        print_json([e.model_dump() for e in events])
        return
    table = Table("seq", "time (UTC)", "kind", "actor", "subject", "detail")
    for e in events:
        add_row(table, e.seq, f"{e.ts:%Y-%m-%d %H:%M:%S}", e.kind, e.actor, e.subject,
                ", ".join(f"{k}={v}" for k, v in e.detail.items()))
    console.print(table)
