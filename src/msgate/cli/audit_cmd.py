"""``msgate audit verify|head|tail``: check the keyed hash chain (and its anchors), export its tip, read recent
events."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from msgate.cli.common import add_row, console, err_console, fail, print_json, state
from msgate.config import Settings
from msgate.storage import audit, audit_anchor, audit_anchor_check
from msgate.storage.audit_anchor import Anchor

app = typer.Typer(no_args_is_help=True)


@app.command()
def verify(
    ctx: typer.Context,
    anchors: Annotated[list[Path] | None, typer.Option(
        "--anchors", help="check the chain against the heads in FILE (repeatable): audit-anchors.jsonl, "
        "`audit head --json` outputs, or a JSON log with audit.anchor lines; default: the configured "
        "audit.anchor_file if it exists")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Verify the whole chain; exit 1 and name the first bad record if it was tampered with, or the first
    anchor the chain no longer has (records cut off its end, a rewritten record)."""
    st = state(ctx)
    sources, loaded, garbled = _anchors(st.settings, anchors)
    store = st.store()
    with store.db.session() as session:
        result = audit.verify(session)
        against = (audit_anchor_check.check(session, loaded, [str(p) for p in sources], garbled)
                   if sources else None)
    _warn_garbled(garbled)
    first = against.findings[0] if against is not None and against.findings else None
    if json_out:
        bad_seq = result.first_bad_seq if not result.ok else (first.seq if first else None)
        reason = result.reason if not result.ok else (first.reason if first else "")
        doc: dict[str, object] = {"ok": result.ok and first is None, "checked": result.checked,
                                  "first_bad_seq": bad_seq, "reason": reason, "keyed_from": result.keyed_from}
        if against is not None:
            doc["anchors"] = against.as_json()
        print_json(doc)
        raise typer.Exit(0 if doc["ok"] else 1)
    _report(result, against)


def _report(result: audit.Verification, against: audit_anchor_check.AnchorCheck | None) -> None:
    """The text verdict: one line on stdout, and the first problem on stderr with exit 1."""
    if not result.ok:
        where = f"at record {result.first_bad_seq}" if result.first_bad_seq is not None else "(not keyed)"
        fail(f"audit chain broken {where}: {result.reason}")
    keyed = f", keyed from seq {result.keyed_from}" if result.keyed_from is not None else ", not keyed"
    if against is None:
        typer.echo(f"audit chain intact: {result.checked} records{keyed}; not checked against anchors "
                   "(no anchor file given or configured)")
        return
    checked = f"checked against {against.checked} anchors from {', '.join(against.sources)}"
    if against.garbled:
        n = len(against.garbled)
        checked += f"; {n} garbled anchor line{'s' if n > 1 else ''} skipped (see the warnings)"
    if against.findings:
        typer.echo(f"audit chain: {result.checked} records{keyed}; {checked}")
        more = f" ({len(against.findings) - 1} more findings)" if len(against.findings) > 1 else ""
        fail(f"audit chain does not match its anchors: {against.findings[0].reason}{more}")
    typer.echo(f"audit chain intact: {result.checked} records{keyed}; {checked}")


def _anchors(settings: Settings, given: list[Path] | None) -> tuple[list[Path], list[Anchor],
                                                                    list[audit_anchor_check.Garbled]]:
    """The anchor files to check against, their anchors and their garbled lines: those given, else the
    configured file if it exists (it may still be empty). A garbled line (a write cut short) is skipped
    and named; a file that cannot be read, or holds no anchor but garbled lines (or, given by name, none
    at all), ends the command (exit 2)."""
    if given:
        paths, required = list(given), True
    else:
        path = audit_anchor.anchor_path(settings)
        paths, required = ([path] if path is not None and path.exists() else []), False
    loaded: list[Anchor] = []
    garbled: list[audit_anchor_check.Garbled] = []
    for path in paths:
        try:
            found = audit_anchor_check.read(path, required=required)
        except audit_anchor_check.AnchorFileError as exc:
            hint = "" if required else " (the configured audit.anchor_file; MSGATE_AUDIT__ANCHOR_FILE=\"\" skips it)"
            fail(f"{exc}{hint}", code=2)
            raise  # not reached: fail() exits
        loaded += found.anchors
        garbled += found.garbled
    return paths, loaded, garbled


_GARBLED_SHOWN = 10


def _warn_garbled(garbled: list[audit_anchor_check.Garbled]) -> None:
    """One warning on stderr per garbled line (the first few), whatever the verdict: an anchor lost there
    is not checked."""
    for item in garbled[:_GARBLED_SHOWN]:
        err_console.print(f"warning: {item.text}; skipped", markup=False, highlight=False)
    if len(garbled) > _GARBLED_SHOWN:
        err_console.print(f"warning: {len(garbled) - _GARBLED_SHOWN} more garbled anchor lines skipped",
                          markup=False, highlight=False)


@app.command()
def head(
    ctx: typer.Context,
    seq: Annotated[int | None, typer.Option("--seq", min=1, help="the record at SEQ instead of the tip: is a "
                                            "head shipped earlier still in the chain?")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print the chain's tip (seq, hash) and where its keyed part starts, to ship to a log host or SIEM.

    Someone with write access to the database can delete the newest records and move the head back: the
    chain alone still verifies. A head recorded elsewhere shows it: the scheduler's anchors, or this output
    (``verify --anchors FILE`` reads it; ``--seq`` of it must still print the same hash). No PHI: not
    audited."""
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
