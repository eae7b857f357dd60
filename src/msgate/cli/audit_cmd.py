"""``msgate audit verify|head|tail``: check the keyed hash chain, export its tip, read recent events."""

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
                    "reason": result.reason, "keyed_from": result.keyed_from})
        raise typer.Exit(0 if result.ok else 1)
    if not result.ok:
        where = f"at record {result.first_bad_seq}" if result.first_bad_seq is not None else "(not keyed)"
        fail(f"audit chain broken {where}: {result.reason}")
    keyed = f", keyed from seq {result.keyed_from}" if result.keyed_from is not None else ", not keyed"
    console.print(f"audit chain intact: {result.checked} records{keyed}")


@app.command()
def head(
    ctx: typer.Context,
    seq: Annotated[int | None, typer.Option("--seq", min=1, help="the record at SEQ instead of the tip: is a "
                                            "head shipped earlier still in the chain?")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print the chain's tip (seq, hash) and where its keyed part starts, to ship to a log host or SIEM.

    The database holds the only copy of the head: someone with write access can delete the newest records
    and move the head back, and ``verify`` still passes. A head recorded elsewhere shows it (``--seq`` of
    it must still print the same hash), and so does a ``keyed_from`` that changed. No PHI: not audited."""
    store = state(ctx).store()
    with store.db.session() as session:
        tip = audit.current_head(session, seq)
    if tip is None:
        fail(f"no audit record {seq} (the chain ends before it)")
        return
    if json_out:
        print_json({"seq": tip.seq, "hash": tip.hash, "keyed_from": tip.keyed_from})
        return
    keyed = tip.keyed_from if tip.keyed_from is not None else "-"
    typer.echo(f"seq {tip.seq} hash {tip.hash} keyed_from {keyed}")  # one line, never wrapped: for a log shipper


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
