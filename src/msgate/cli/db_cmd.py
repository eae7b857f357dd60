"""``msgate db upgrade|current|purge``: migrations and retention (``purge --study ID``: one study now)."""

from __future__ import annotations

from typing import Annotated

import typer

from msgate.cli.common import (check_schema, console, err_console, fail, missing_sqlite, print_json, say,
                               schema_mismatch, state)
from msgate.storage import audit, keyring, retention
from msgate.storage.db import Database
from msgate.storage.models import Study
from msgate.storage.store import Store

app = typer.Typer(no_args_is_help=True)


@app.command()
def upgrade(ctx: typer.Context, revision: str = "head") -> None:
    """Apply database migrations (``serve`` also applies them when it starts)."""
    settings = state(ctx).settings
    settings.home.mkdir(parents=True, exist_ok=True)
    check_schema(settings, migrating=True)  # a newer msgate's schema: alembic only said "Can't locate revision"
    db = Database(settings.resolved_database_url)
    try:  # revision 0007 keys the audit chain with the key ring's audit key; without a ring it refuses
        key = audit.chain_key(keyring.load(settings.keyring_path).index_key) if settings.keyring_path.exists() else None
        db.upgrade(revision, audit_key=key)
        console.print(f"database at revision {db.current_revision()}")
    finally:
        db.dispose()


@app.command()
def current(ctx: typer.Context) -> None:
    """Show the database's migration revision, and whether it is this msgate's."""
    if missing_sqlite(state(ctx).settings) is not None:  # never created by this check
        say("empty (run `msgate db upgrade`)")
        return
    db = Database(state(ctx).settings.resolved_database_url)
    try:
        revision = db.current_revision()
    finally:
        db.dispose()
    problem = schema_mismatch(revision) if revision else None
    say(revision or "empty (run `msgate db upgrade`)")
    if problem:  # on stderr: stdout stays the revision alone, for scripts
        err_console.print(f"note: {problem}", markup=False, highlight=False)


@app.command()
def purge(
    ctx: typer.Context,
    study: Annotated[int | None, typer.Option("--study", help="purge this study now, whatever its age")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report what would be purged")] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Apply retention now: purge source images and engine texts of finished studies with nothing left to
    deliver, delivered or never used (index rows and audit stay). The scheduler role also does it every
    ``storage.purge_interval_s``; a running purge is waited for. ``--study``: that one study only, audited with
    the operator's name, if retention could purge it at all (no run to come, no result to deliver)."""
    store = state(ctx).store()
    if study is not None:
        _purge_one(store, study, dry_run, json_out)
        return
    report = retention.purge(store, dry_run=dry_run)
    if json_out:
        print_json(report.as_dict())
        return
    verb = "would purge" if dry_run else "purged"
    console.print(f"{verb} {len(report.studies)} studies ({report.unused} with no result to deliver), "
                  f"{report.blobs} blobs, {report.bytes / 1e6:.1f} MB "
                  f"({report.by_age} by age, {report.by_space} by free space); {report.engine_texts} engine texts "
                  f"{'would be ' if dry_run else ''}erased")


def _purge_one(store: Store, study_id: int, dry_run: bool, json_out: bool) -> None:
    with store.db.session() as session:
        row = session.get(Study, study_id)
        if row is None or row.purged_at is not None:
            fail(f"no study {study_id}" if row is None else f"study {study_id} is already purged")
            return
    purged = retention.purge_one(store, study_id, actor=audit.operator(), dry_run=dry_run)
    if purged is None:
        fail(f"study {study_id} is not purgeable now: it is receiving, has a run queued or running or a result "
             f"still to deliver, or is ready and may still be planned again (`msgate studies show {study_id}`)")
        return
    if json_out:
        print_json({"study": study_id, "dry_run": dry_run, "blobs": purged.blobs, "engine_texts": purged.engine_texts})
        return
    say(f"{'would purge' if dry_run else 'purged'} study {study_id}: {purged.blobs} blobs, "
        f"{purged.engine_texts} engine texts")
