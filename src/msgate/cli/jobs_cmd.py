"""``msgate jobs list|show|retry|cancel``: inference jobs, their stage timings and failure reasons.

Jobs hold no PHI (internal ids, states, timings, reasons), so showing them is not a PHI view; retry
and cancel are operator actions and are recorded in the audit chain (``job.retry``/``job.cancel``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table
from sqlmodel import Session, col, select

from msgate.cli.common import add_row, console, fail, print_json, say, state
from msgate.storage import audit
from msgate.storage.models import Job, Result, utcnow
from msgate.storage.store import Store

app = typer.Typer(no_args_is_help=True)
RETRYABLE = ("failed", "cancelled")
CANCELLABLE = ("queued", "running")
# Job.state values (workers/jobs.py); --state was free text, and a typo ("error") listed nothing, exit 0
JobState = Literal["queued", "running", "done", "failed", "superseded", "cancelled"]
STAGES = ("queue_wait_ms", "load_ms", "decode_ms", "transforms_ms", "inference_ms", "store_ms", "ready_to_result_ms")


def _ts(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def job_doc(job: Job, *, has_result: bool | None = None) -> dict[str, Any]:
    flags = job.flags or {}
    doc = {"id": job.id, "study_id": job.study_id, "state": job.state, "model_version": job.model_version,
           "attempts": job.attempts, "error": job.error, "supersedes": job.supersedes_id,
           "created_at": _ts(job.created_at), "published_at": _ts(job.published_at),
           "started_at": _ts(job.started_at), "finished_at": _ts(job.finished_at),
           "stages": dict(job.stages or {}), "series": flags.get("series", {}),
           "ehr_missing": flags.get("ehr_missing", []), "ehr_deadline": bool(flags.get("required_missing")),
           "handed_off_at": flags.get("handoff_at")}
    if has_result is not None:
        doc["result"] = has_result
    return doc


@app.command("list")
def list_(
    ctx: typer.Context,
    state_filter: Annotated[JobState | None, typer.Option("--state", help="only jobs in this state")] = None,
    study: Annotated[int | None, typer.Option("--study", help="jobs of one study")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="most recent first")] = 100,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List jobs, newest first."""
    store = state(ctx).store()
    with store.db.session() as session:
        query = select(Job).order_by(col(Job.created_at).desc()).limit(limit)
        if state_filter:
            query = query.where(Job.state == state_filter)
        if study is not None:
            query = query.where(Job.study_id == study)
        docs = [job_doc(j) for j in session.exec(query).all()]
    if json_out:
        print_json(docs)
        return
    table = Table("job", "study", "state", "created (UTC)", "tries", "batch", "inference ms", "ready->result ms",
                  "reason")
    for d in docs:
        st = d["stages"]
        add_row(table, d["id"], d["study_id"], d["state"], d["created_at"], d["attempts"], st.get("batch"),
                st.get("inference_ms"), st.get("ready_to_result_ms"), (d["error"] or "")[:60])
    console.print(table)


def job_id_of(session: Session, ident: str) -> str:
    """The full id of the job ``ident`` names: its id, or a unique prefix (lists show ids cut short). A
    prefix is matched literally: ``%`` or ``_`` in it are not LIKE wildcards."""
    if session.get(Job, ident) is not None:
        return ident
    matches = session.exec(select(Job.id).where(col(Job.id).startswith(ident, autoescape=True)).limit(2)).all()
    if len(matches) > 1:
        fail(f"{ident!r} matches several jobs; give more of the job id")
    if not matches:
        fail(f"no job {ident}")
    return matches[0]


def _get(store: Store, job_id: str) -> Job:
    with store.db.session() as session:
        job = session.get(Job, job_id_of(session, job_id))
    assert job is not None
    return job


@app.command()
def show(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="job id (or a unique prefix)")],
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One job: state, reason, stage timings, the series it used and its EHR gaps."""
    store = state(ctx).store()
    job = _get(store, job_id)
    with store.db.session() as session:
        has_result = session.exec(select(Result.id).where(Result.job_id == job.id)).first() is not None
    doc = job_doc(job, has_result=has_result)
    if json_out:
        print_json(doc)
        return
    console.print(f"job {doc['id']}  study {doc['study_id']}  state [bold]{escape(doc['state'])}[/bold]  "
                  f"attempts {doc['attempts']}  model {escape(doc['model_version'] or '-')}  "
                  f"result {'yes' if has_result else 'no'}")
    if doc["error"]:
        say(f"reason: {doc['error']}")
    if doc["supersedes"]:
        say(f"supersedes job {doc['supersedes']}")
    say(f"created {doc['created_at']}  published {doc['published_at'] or '-'}  started "
        f"{doc['started_at'] or '-'}  finished {doc['finished_at'] or '-'}")
    table = Table("stage", "ms")
    for name in STAGES:
        if name in doc["stages"]:
            add_row(table, name.removesuffix("_ms"), doc["stages"][name])
    if "batch" in doc["stages"]:
        add_row(table, "batch size", doc["stages"]["batch"])
    console.print(table)
    if doc["ehr_missing"]:
        say(f"EHR missing: {', '.join(doc['ehr_missing'])}"
            + ("  (ran after the EHR deadline)" if doc["ehr_deadline"] else ""))


def _publish(store: Store, job_id: str) -> bool:
    from msgate.workers import jobs, tasks
    from msgate.workers.celery_app import build_app

    try:
        tasks.send_infer(build_app(store.settings), job_id)
    except Exception:
        return False
    jobs.mark_published(store.db, job_id)
    return True


def _transition(store: Store, job_id: str, allowed: tuple[str, ...], rule: str, kind: str,
                change: Callable[[Job], None]) -> str:
    """Change a job under a row lock if its state allows it, with an audit event; returns the previous state."""
    with store.db.session() as session:
        row = session.exec(select(Job).where(Job.id == job_id).with_for_update()).one()
        if row.state not in allowed:
            fail(f"job {row.id} is {row.state}; only {rule}")
        previous = row.state
        change(row)
        session.add(row)
        audit.append(session, kind=kind, actor=audit.operator(), subject=f"job:{row.id}", detail={"from": previous})
    return previous


@app.command()
def retry(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="a failed or cancelled job")],
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Queue a failed or cancelled job again (same case, same key)."""
    store = state(ctx).store()
    job = _get(store, job_id)

    with store.db.session() as session:
        later = session.exec(select(Job.id).where(Job.study_id == job.study_id, Job.id != job.id,
                                                  col(Job.created_at) > job.created_at)).first()
    if later is not None:  # its stale result would be delivered after the newer one's
        fail(f"job {job.id} has a newer job for its study ({later}); retry that one instead")

    def requeue(row: Job) -> None:
        row.state, row.published_at, row.finished_at, row.error = "queued", None, None, None
        row.attempts = 0  # a full retry budget (the audit chain keeps the earlier attempts)
        row.flags = {k: v for k, v in row.flags.items()
                     if k not in ("owner", "lease_until", "handoff_at", "handoffs", "rendered_at", "publish_error",
                                 "released_at")}

    _transition(store, job.id, RETRYABLE, "failed or cancelled jobs can be retried", "job.retry", requeue)
    published = _publish(store, job.id)
    out = {"id": job.id, "state": "queued", "published": published}
    if json_out:
        print_json(out)
    else:
        console.print(f"job {job.id} queued again" + ("" if published else " (broker unreachable: the scheduler's "
                                                                              "reconciler will send it)"))


@app.command()
def cancel(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="a queued or running job")],
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Cancel a queued or running job (a running one finishes its computation but is not published)."""
    store = state(ctx).store()
    job = _get(store, job_id)

    def stop(row: Job) -> None:
        row.state, row.finished_at, row.error = "cancelled", utcnow(), "cancelled by operator"

    previous = _transition(store, job.id, CANCELLABLE, "queued or running jobs can be cancelled", "job.cancel", stop)
    if json_out:
        print_json({"id": job.id, "state": "cancelled", "from": previous})
    else:
        console.print(f"job {job.id} cancelled (was {previous})")
