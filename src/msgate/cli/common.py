"""Shared CLI plumbing: the Settings built once in the main callback, clean errors, JSON output."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console

from msgate.config import Settings, load_settings
from msgate.storage.store import Store, open_store

console = Console()
err_console = Console(stderr=True)


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


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)
