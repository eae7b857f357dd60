"""Shared CLI plumbing: the Settings built once in the main callback, clean errors, JSON output.

Stored data (PHI, DICOM text, HL7 fields, peer answers, reasons) is never rich markup: a series
description ``T2 [/fs] SAG`` must print as-is, not vanish or crash the view. Print it through
:func:`say`, :func:`add_row` or :func:`cell`, or ``rich.markup.escape`` it inside markup of our own.
"""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from msgate.config import Settings, load_settings
from msgate.storage.store import Store, open_store

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error names a path or a setting: never broken


class State:
    """What the main callback puts in ``ctx.obj``."""

    def __init__(self, settings: Settings, debug: bool = False) -> None:
        self.settings = settings
        self.debug = debug
        self._store: Store | None = None

    def store(self, *, migrate: bool = True, create_keys: bool = False) -> Store:
        if self._store is None:
            self._store = open_store(self.settings, migrate=migrate, create_keys=create_keys)
        return self._store


def state(ctx: typer.Context) -> State:
    """The State of the running command; sub-apps invoked on their own build it from the environment."""
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State(load_settings())
    return root.obj


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str, sort_keys=True))


def cell(value: Any, style: str = "") -> Text:
    """A value shown verbatim (never markup); None shows as empty."""
    return Text("" if value is None else str(value), style=style)


def add_row(table: Table, *values: Any) -> None:
    """Add a table row of verbatim cells (a :class:`Text` is kept with its style)."""
    table.add_row(*(v if isinstance(v, Text) else cell(v) for v in values))


def say(line: str) -> None:
    """Print one line of data verbatim: no markup, no highlighting."""
    console.print(line, markup=False, highlight=False)


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)
