"""The ``msgate`` command: one typer sub-app per group, one file per group (typer docs)."""

from __future__ import annotations

import errno
import importlib
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from msgate import __version__
from msgate.cli import audit_cmd, db_cmd, keys_cmd, serve_cmd
from msgate.cli.common import State, err_console
from msgate.config import load_settings
from msgate.errors import MsgateError
from msgate.log import setup_logging

app = typer.Typer(name="msgate", help="msgate: hospital-side AI worker for MS (DICOM + HL7 in, SR + ORU out).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.add_typer(keys_cmd.app, name="keys", help="Key ring: init, rotate, status, retire; he: the CKKS keys.")
app.add_typer(db_cmd.app, name="db", help="Database migrations and retention.")
app.add_typer(audit_cmd.app, name="audit", help="Audit chain: verify, tail.")
app.command("serve")(serve_cmd.serve)

# Command groups of the pipeline stages, one file each. A group whose module is not part of this
# build is left out of --help; an error inside a module that exists is raised, not hidden.
GROUPS = (
    ("studies_cmd", "studies", "Studies received by the DICOM listener."),
    ("rules_cmd", "rules", "What the routing and role rules decide for DICOM files."),
    ("messages_cmd", "messages", "HL7 messages received by the feed."),
    ("patients_cmd", "patients", "Patients and their EHR feature snapshot."),
    ("jobs_cmd", "jobs", "Inference jobs: list, show, retry, cancel."),
    ("outbox_cmd", "outbox", "Result deliveries: list, show, retry, drop."),
    ("synth", "synth", "Synthetic MS cohort as DICOM + HL7 files."),
    ("train_cmd", "train", "Train the models on the synthetic cohort or the store."),
    ("evaluate_cmd", "evaluate", "Evaluation reports with plots."),
    ("status_cmd", "status", None),
    ("trace_cmd", "trace", None),
    ("demo_cmd", "demo", None),
)


def _mount(module_name: str, name: str, help_text: str | None) -> None:
    full = f"msgate.cli.{module_name}"
    try:
        module = importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name == full:
            return
        raise
    if help_text is None:  # a single command, not a group
        app.command(name)(module.command)
    else:
        app.add_typer(module.app, name=name, help=help_text)


for _module, _name, _help in GROUPS:
    _mount(_module, _name, _help)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"msgate {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML settings file")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    """Settings come from MSGATE_* environment variables and the optional --config TOML file."""
    settings = load_settings(config)
    setup_logging(settings.log_level, settings.log_format)
    ctx.obj = State(settings, debug=debug)


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        code = app(prog_name="msgate", standalone_mode=False)  # the exit code of typer.Exit
    except MsgateError as exc:
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(2 if exc.code in ("config", "key_permissions", "key_not_found") else 1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except typer.TyperException as exc:  # typer bundles its own click: not a click.ClickException
        show = getattr(exc, "show", None)
        if callable(show):
            show()  # the usage line, then "Error: ..."
        else:
            err_console.print(f"[red]error:[/red] {escape(exc.format_message())}", highlight=False)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a folder that cannot be made, a full disk, a port in use: the OS's own words
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {escape(describe_os_error(exc))}", highlight=False)
        sys.exit(1)
    except Exception as exc:  # the CLI's edge: one line, no traceback, unless --debug
        if debug:
            raise
        if is_migration_error(exc):  # e.g. `db upgrade --revision` of a revision msgate does not have
            err_console.print(f"[red]error:[/red] database migration failed: {escape(str(exc))}", highlight=False)
            sys.exit(2)
        err_console.print(f"[red]error:[/red] unexpected {type(exc).__name__}; rerun with --debug for details")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def describe_os_error(exc: OSError) -> str:
    """``cannot use PATH: Not a directory (ENOTDIR)``: the path (msgate's own folders, named by internal
    ids, or one the operator gave) and the errno, never a traceback."""
    name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    where = f"cannot use {exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or type(exc).__name__} ({name})"


def is_migration_error(exc: BaseException) -> bool:
    """alembic's CommandError (a revision it cannot find or reach), without importing alembic for every
    command. It read "unexpected CommandError"; its text names revisions only, never data."""
    kind = type(exc)
    return kind.__name__ == "CommandError" and kind.__module__.startswith("alembic")
