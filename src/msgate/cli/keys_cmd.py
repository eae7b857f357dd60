"""``msgate keys init|rotate|status|retire``: the key ring and the data keys it wraps."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from msgate.cli import keys_he_cmd
from msgate.cli.common import add_row, cell, check_schema, console, print_json, state
from msgate.errors import ConfigError
from msgate.storage import audit, journal, keyring, rotation

app = typer.Typer(no_args_is_help=True)
app.add_typer(keys_he_cmd.app, name="he")  # the CKKS keys of homomorphic mode
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


@app.command()
def init(ctx: typer.Context) -> None:
    """Create a new key ring (mode 0600) at MSGATE_KEYRING_FILE (default MSGATE_HOME/keys/keyring.json)."""
    settings = state(ctx).settings
    ring = keyring.init(settings.keyring_path)
    console.print(f"created key ring {settings.keyring_path} with active key [bold]{ring.active_id}[/bold]")
    console.print("Back it up now: without it, nothing msgate stored can be decrypted.")


@app.command()
def rotate(
    ctx: typer.Context,
    resume: Annotated[bool, typer.Option("--resume", help="only finish re-wrapping; add no new key")] = False,
) -> None:
    """Add a new active KEK and re-wrap every data key under it (bodies are not re-encrypted)."""
    st = state(ctx)
    path = st.settings.keyring_path
    keyring.load(path)  # a missing or unreadable key ring is named first
    check_schema(st.settings, migrating=False)  # refused before the ring changes, not after
    with keyring.locked(path):
        ring = keyring.load(path)
        if not resume:
            ring = ring.with_new_kek()
            keyring.save(ring, path)
    if not resume:
        console.print(f"new active key [bold]{ring.active_id}[/bold]; running services read the data re-wrapped "
                      "under it (they re-read the key ring); restart them so they also wrap new data under it")
    store = st.store()
    with store.db.session() as session:
        total = rotation.pending(session, ring.active_id)
    with Progress(TextColumn("re-wrapping data keys"), BarColumn(), MofNCompleteColumn(), console=console) as bar:
        task = bar.add_task("rewrap", total=total)
        report = rotation.rotate(store, progress=lambda n: bar.advance(task, n))
        bar.update(task, completed=total)
    console.print(f"re-wrapped {report.rewrapped_blobs} blob keys and {report.rewrapped_keys} field keys")
    if report.shredded:
        console.print(f"erased the data keys of {report.shredded} purged blobs")
    if report.remaining:
        console.print(f"[yellow]still wrapped by old keys: {report.remaining}; run `msgate keys rotate --resume`")


@app.command()
def status(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Key ids, ages, and how many data keys each wraps."""
    st = state(ctx)
    ring = keyring.load(st.settings.keyring_path)
    store = st.store()
    with store.db.session() as session:
        usage = rotation.key_usage(session, st.settings.home)
    now = datetime.now(UTC)
    rows = [{"id": k.id, "active": k.id == ring.active_id, "created": k.created.isoformat(),
             "age_days": round((now - k.created).total_seconds() / 86400, 1), "wraps": usage.get(k.id, 0)}
            for k in ring.keks]
    unknown = sorted(set(usage) - {k.id for k in ring.keks})
    if json_out:
        print_json({"keys": rows, "missing_keys": unknown, "keyring": str(st.settings.keyring_path)})
        return
    table = Table("key id", "active", "age (days)", "data keys wrapped")
    for row in rows:
        add_row(table, row["id"], "yes" if row["active"] else "", row["age_days"], row["wraps"])
    console.print(table)
    if unknown:
        console.print(cell(f"data keys wrapped by keys missing from the ring: {unknown}; restore the key ring "
                           "backup taken with this database backup", style="red"))


def _roles_on_an_older_ring(store: object, active_created: datetime) -> list[str]:
    """Running roles (a fresh heartbeat) started before the active KEK was made: they loaded the key ring
    before the rotation and still wrap new data keys under the KEK that was active then."""
    from msgate.storage import heartbeat

    now = datetime.now(UTC)
    return sorted({f"{b.role}@{b.instance}" for b in heartbeat.read(store.db)  # type: ignore[attr-defined]
                   if (now - _aware(b.beat_at)).total_seconds() <= heartbeat.INTERVAL_S * 4
                   and _aware(b.started_at) < active_created})


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@app.command()
def retire(
    ctx: typer.Context,
    kek_id: str,
    force: Annotated[bool, typer.Option("--force", help="retire although roles started before the rotation "
                                                        "are still running")] = False,
) -> None:
    """Drop an old KEK once no data key is wrapped by it and every running role has the new key ring."""
    st = state(ctx)
    store = st.store()
    with keyring.locked(st.settings.keyring_path):  # a rotation cannot slip in between load and save
        _retire(st, store, kek_id, force)
    console.print(f"retired {kek_id}")
    console.print(RETIRE_WARNING.format(kek_id=kek_id), style="yellow")


RETIRE_WARNING = (
    "Database and blob backups taken before now may hold data keys wrapped by {kek_id}: the key ring "
    "as it is now cannot restore them. Keep the key ring backup taken with each database backup for as "
    "long as that backup is kept (docs/operations.md, Backup and restore), and back up the key ring now."
)


def _retire(st: Any, store: Any, kek_id: str, force: bool) -> None:
    ring = keyring.load(st.settings.keyring_path)
    stale = _roles_on_an_older_ring(store, ring.get(ring.active_id).created)
    if stale and not force:
        raise ConfigError(f"roles started before the active key {ring.active_id} are still running "
                          f"({', '.join(stale)}): they still wrap new data under an older key; restart them, "
                          "then retire")
    with store.db.session() as session:
        still = rotation.key_usage(session, st.settings.home).get(kek_id, 0)
    if still:
        raise ConfigError(f"key {kek_id} still wraps {still} data keys; run `msgate keys rotate --resume` first")
    segments = journal.key_usage(st.settings.home).get(kek_id, 0)
    if segments:  # acknowledged instances or messages not yet indexed: dropping the key would lose them
        raise ConfigError(f"key {kek_id} still wraps {segments} commit-journal segments (received, not yet "
                          "indexed); run the dicom and hl7 roles until their journals are indexed, then retire")
    keyring.save(ring.without(kek_id), st.settings.keyring_path)
    with store.db.session() as session:
        audit.append(session, kind="key.retire", actor=audit.operator(), subject=f"kek:{kek_id}")
