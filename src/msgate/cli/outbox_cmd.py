"""``msgate outbox list|show|retry|drop [--json]``: result deliveries, their attempts and peer answers.

``list`` shows every entry with its attempts (``--state dead`` for the dead letters); ``retry`` makes
dead or waiting entries due now (their max-age window restarts); ``drop`` abandons entries. Both
actions are recorded as attempts and audited with the operator's name. ``list`` holds internal ids,
destinations, peer statuses and coded answers only, no PHI; an attempt whose peer explained itself in
free text (an engine's MSA-3 and ERR-8: "Patient DOE^JOHN not found") is marked ``*``. ``show ID``
prints one entry's attempts with that text, decrypted, and records the view (``phi.view``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import typer
from rich.table import Table
from sqlmodel import Session, col, select

from msgate.cli.common import add_row, console, fail, print_json, say, state
from msgate.cli.jobs_cmd import job_id_of
from msgate.results import outbox_ops as outbox
from msgate.storage import audit
from msgate.storage.models import Blob, OutboxEntry
from msgate.storage.store import Store

app = typer.Typer(no_args_is_help=True)
EntryState = Literal["pending", "sending", "delivered", "dead", "dropped"]  # OutboxEntry.state


@app.command("list")
def list_(
    ctx: typer.Context,
    state_: Annotated[EntryState | None, typer.Option("--state", help="only entries in this state")] = None,
    job: Annotated[str | None, typer.Option("--job", help="only this job's entries (a unique prefix)")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 50,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List outbox entries (newest first) with every attempt and the peer's answer."""
    store = state(ctx).store()
    with store.db.session() as session:
        job_id = job_id_of(session, job) if job is not None else None  # the list shows 12 characters of it
        rows = outbox.entries(session, state=state_, job_id=job_id, limit=limit)
        kinds = dict(session.exec(select(Blob.id, Blob.kind).where(col(Blob.id).in_([r.blob_id for r in rows]))).all())
        data = [outbox.summary(r, outbox.attempts_of(session, r.id), kinds.get(r.blob_id, "")) for r in rows]
    if json_out:
        print_json(data)
        return
    table = Table("id", "job", "object", "destination", "state", "tries", "next / delivered (UTC)", "last answer")
    explained = False
    for d in data:
        when = d["delivered_at"] or (d["next_attempt_at"] if d["state"] in ("pending", "sending") else None)
        last = d["history"][-1] if d["history"] else None
        answer = f"{last['outcome']} {last['peer_status']}".strip() if last else ""
        if last and last["has_peer_text"]:
            answer, explained = f"{answer} *", True
        add_row(table, d["id"][:12], (d["job_id"] or "")[:12], d["object"], d["destination"], d["state"],
                d["attempts"], f"{when:%Y-%m-%d %H:%M:%S}" if when else "", answer)
    console.print(table)
    if explained:
        say("* the peer explained its answer: msgate outbox show ID (the text is shown and audited there)")


def _one(session: Session, prefix: str) -> OutboxEntry:
    like = col(OutboxEntry.id).startswith(prefix, autoescape=True)  # "%" is not a wildcard
    matches = session.exec(select(OutboxEntry).where(like).limit(2)).all()
    if len(matches) != 1:
        fail(f"{prefix!r} matches {'no' if not matches else 'several'} outbox entries")
    return matches[0]


def _show_doc(store: Store, session: Session, entry: OutboxEntry) -> dict[str, Any]:
    """The entry and its attempts with their peer text decrypted; a phi.view event when any is shown."""
    attempts = outbox.attempts_of(session, entry.id)
    blob = session.get(Blob, entry.blob_id)
    doc = outbox.summary(entry, attempts, blob.kind if blob is not None else "")
    texts = outbox.peer_texts(store, attempts)
    erased = outbox.erased_texts(session, entry, attempts)  # nothing decrypted: not a PHI view
    for item, attempt in zip(doc["history"], attempts, strict=True):
        item["peer_text"] = texts.get(attempt.id or 0)
        item["peer_text_erased"] = attempt.id in erased
    if texts:
        audit.append(session, kind="phi.view", actor=audit.operator(), subject=f"outbox:{entry.id}",
                     detail={"view": "outbox.show", "attempt_ids": sorted(texts), "count": len(texts)})
    return doc


@app.command()
def show(
    ctx: typer.Context,
    entry_id: Annotated[str, typer.Argument(metavar="ID", help="entry id (a unique prefix is enough)")],
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One entry with every attempt, and the peer's own explanation of its answers (an interface engine's
    MSA-3 and ERR text, which can name the patient: decrypted for this view, which is audited)."""
    store = state(ctx).store()
    with store.db.session() as session:
        doc = _show_doc(store, session, _one(session, entry_id))
    if json_out:
        print_json(doc)
        return
    say(f"outbox {doc['id']}  job {doc['job_id'] or '-'}  {doc['kind']} {doc['object']} to {doc['destination']}")
    say(f"state {doc['state']}  tries {doc['attempts']}  created {_when(doc['created_at'])} UTC  "
        f"delivered {_when(doc['delivered_at'])}")
    if doc["last_error"]:
        say(f"last error: {doc['last_error']}")
    for item in doc["history"]:
        say(f"{_when(item['at'])}  {item['outcome']:<11} {item['peer_status'] or '-':<10} {item['detail']}")
        for line in (item["peer_text"] or "").splitlines():
            say(f"{'':21}peer: {line}")
        if item["peer_text_erased"]:
            say(f"{'':21}peer: (engine text erased by retention)")


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value is not None else "-"


def _resolve(ctx: typer.Context, ids: list[str], dead: bool, job: str | None) -> list[str]:
    store = state(ctx).store()
    with store.db.session() as session:
        query = select(OutboxEntry.id)
        if dead:
            query = query.where(OutboxEntry.state == "dead")
        if job is not None:  # a prefix, as `outbox list` shows it: the full id only selected nothing
            query = query.where(OutboxEntry.job_id == job_id_of(session, job))
        found = set(session.exec(query).all()) if (dead or job is not None) else set()
        found.update(_one(session, prefix).id for prefix in ids)
    if not found:
        fail("no outbox entry matches --dead/--job" if dead or job is not None
             else "nothing selected: give entry ids, --dead or --job")
    return sorted(found)


@app.command()
def retry(
    ctx: typer.Context,
    ids: Annotated[list[str] | None, typer.Argument(help="entry ids (a unique prefix is enough)")] = None,
    dead: Annotated[bool, typer.Option("--dead", help="every dead-lettered entry")] = False,
    job: Annotated[str | None, typer.Option("--job", help="every entry of this job (a unique prefix)")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Send dead or waiting entries again now."""
    selected = _resolve(ctx, ids or [], dead, job)
    done = outbox.requeue(state(ctx).store(), selected, actor=audit.operator())
    _report("requeued", done, selected, json_out)


@app.command()
def drop(
    ctx: typer.Context,
    ids: Annotated[list[str] | None, typer.Argument(help="entry ids (a unique prefix is enough)")] = None,
    dead: Annotated[bool, typer.Option("--dead", help="every dead-lettered entry")] = False,
    job: Annotated[str | None, typer.Option("--job", help="every entry of this job (a unique prefix)")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Abandon entries: they are never sent."""
    selected = _resolve(ctx, ids or [], dead, job)
    done = outbox.drop(state(ctx).store(), selected, actor=audit.operator())
    _report("dropped", done, selected, json_out)


def _report(action: str, done: list[str], selected: list[str], json_out: bool) -> None:
    skipped = [i for i in selected if i not in done]
    if json_out:
        print_json({action: done, "skipped": skipped})
        return
    console.print(f"{action} {len(done)} entr{'y' if len(done) == 1 else 'ies'}"
                  + (f"; skipped {len(skipped)} (delivered, dropped or in flight)" if skipped else ""))
