"""Shared CLI plumbing: the Settings built once in the main callback, clean errors, JSON output.

Stored data (PHI, DICOM text, HL7 fields, peer answers, reasons) is never rich markup: a series
description ``T2 [/fs] SAG`` must print as-is, not vanish or crash the view. Print it through
:func:`say`, :func:`add_row` or :func:`cell`, or ``rich.markup.escape`` it inside markup of our own.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from msgate import __version__
from msgate.config import Settings, load_settings
from msgate.errors import ConfigError
from msgate.storage.db import MIGRATIONS, Database
from msgate.storage.store import Store, open_store

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error names a path or a setting: never broken


class State:
    """What the main callback puts in ``ctx.obj``."""

    def __init__(self, settings: Settings, debug: bool = False) -> None:
        self.settings = settings
        self.debug = debug
        self._store: Store | None = None

    def store(self, *, migrate: bool | None = None, create_keys: bool = False) -> Store:
        """The store, opened once. Only ``serve`` (``create_keys=True``, the one call that may set up a
        home; ``migrate`` follows it unless given) migrates. Every other command migrated too: a read-only
        check such as ``audit verify`` silently upgraded a restored older backup, and a database of a newer
        msgate failed each command with "unexpected CommandError". They now refuse a database whose schema
        is not this msgate's, naming both revisions and the fix."""
        if self._store is None:
            migrating = create_keys if migrate is None else migrate
            if migrating or self.settings.keyring_path.exists():  # no key ring: open_store names that first
                check_schema(self.settings, migrating=migrating)
            self._store = open_store(self.settings, migrate=migrating, create_keys=create_keys)
        return self._store


@cache
def _revisions() -> tuple[str, frozenset[str]]:
    """This msgate's head schema revision and every revision it knows (its alembic scripts)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS))
    return str(script.get_current_head()), frozenset(r.revision for r in script.walk_revisions())


def head_revision() -> str:
    return _revisions()[0]


def schema_mismatch(current: str | None) -> str | None:
    """Why this msgate cannot use a database at schema revision ``current`` as it is, or None."""
    head, known = _revisions()
    if current == head:
        return None
    if current is None:
        return "the database has no msgate schema; run `msgate db upgrade` (or start `msgate serve`)"
    if current in known:
        return (f"the database is at schema revision {current}, this msgate ({__version__}) needs {head}: "
                "back it up, then run `msgate db upgrade`")
    return (f"the database is at schema revision {current}, which this msgate ({__version__}, schema {head}) "
            "does not know: a newer msgate migrated it; install that msgate version (or restore a backup made "
            "with this one)")


def missing_sqlite(settings: Settings) -> Path | None:
    """The embedded database file when it does not exist yet. A probe (``status``, ``db current``) must not
    create it: an empty file made the home look used, so a first ``serve`` no longer set up its key ring."""
    url = settings.resolved_database_url
    path = url.split("sqlite:///", 1)[1] if url.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" and not Path(path).exists() else None


def check_schema(settings: Settings, *, migrating: bool) -> None:
    """Raise ConfigError (exit 2) unless the database is at this msgate's head revision; ``migrating``
    (serve, ``db upgrade``) accepts an older or empty one and refuses only a newer one. A missing SQLite
    file is not created here: on a fresh home serve decides whether to set it up."""
    missing = missing_sqlite(settings)
    if missing is not None:
        if migrating:
            return
        raise ConfigError(f"no database at {missing}; run `msgate db upgrade` (or start `msgate serve`)")
    db = Database(settings.resolved_database_url)
    try:
        current = db.current_revision()
    finally:
        db.dispose()
    problem = schema_mismatch(current)
    if problem and not (migrating and (current is None or current in _revisions()[1])):
        raise ConfigError(problem)


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
