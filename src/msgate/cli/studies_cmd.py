"""``msgate studies list|show|quarantine``: operator views of received studies.

PHI (accession, patient id, study date, series descriptions) is decrypted only for display, and
every display is recorded in the audit chain (``phi.view``, actor = :func:`audit.operator`: the OS account
running the command, and the invoking one under sudo).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer
from rich.table import Table
from sqlmodel import Session

from msgate.cli.common import add_row, console, fail, print_json, say, state
from msgate.storage import audit, repo_studies
from msgate.storage.models import Study
from msgate.storage.store import Store

app = typer.Typer(no_args_is_help=True)
StudyState = Literal["receiving", "ready", "stable", "stored", "ignored"]  # repo_studies' states
AUDIT_CHUNK = 500  # study ids per phi.view event of one listing


def _ts(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _study_doc(store: Store, study: Study) -> dict[str, Any]:
    dec = store.cipher.decrypt
    return {
        "id": study.id, "accession": dec(study.accession_enc, column="study.accession"),
        "patient_id": dec(study.patient_id_enc, column="study.patient_id"),
        "study_date": dec(study.study_date_enc, column="study.study_date"),
        "state": study.state, "route": study.route, "calling_aet": study.calling_aet,
        "modalities": study.modalities, "instances": study.instance_count, "runs": study.runs,
        "first_received_at": _ts(study.first_received_at), "last_received_at": _ts(study.last_received_at),
        "ready_at": _ts(study.ready_at),
    }


def _audit_listing(session: Session, study_ids: list[int]) -> None:
    """One phi.view event per chunk of displayed ids, so every study shown is attributable."""
    chunks = [study_ids[i:i + AUDIT_CHUNK] for i in range(0, len(study_ids), AUDIT_CHUNK)]
    operator = audit.operator()
    audit.append_many(session, [
        ("phi.view", operator, "studies:list",
         {"study_ids": chunk, "count": len(study_ids), "part": n, "parts": len(chunks)})
        for n, chunk in enumerate(chunks, start=1)])


@app.command("list")
def list_(
    ctx: typer.Context,
    state_filter: Annotated[StudyState | None, typer.Option("--state", help="only studies in this state")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="most recent first")] = 200,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List studies, newest first (PHI shown is audited)."""
    store = state(ctx).store()
    with store.db.session() as session:
        studies = repo_studies.list_studies(session, state=state_filter, limit=limit)
        docs = [_study_doc(store, s) for s in studies]
        _audit_listing(session, [d["id"] for d in docs])
    if json_out:
        print_json(docs)
        return
    table = Table("id", "accession", "patient id", "study date", "state", "route", "AE", "inst", "received (UTC)",
                  "ready (UTC)")
    for d in docs:
        add_row(table, d["id"], d["accession"], d["patient_id"], d["study_date"], d["state"], d["route"],
                d["calling_aet"], d["instances"], d["last_received_at"], d["ready_at"])
    console.print(table)


@app.command()
def show(
    ctx: typer.Context,
    study_id: Annotated[int, typer.Argument(help="study id from `msgate studies list`")],
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One study with its series (role, instance count) and associations (PHI shown is audited)."""
    store = state(ctx).store()
    dec = store.cipher.decrypt
    with store.db.session() as session:
        study = session.get(Study, study_id)
        if study is None:
            fail(f"no study {study_id}")
            return
        doc = _study_doc(store, study)
        doc["series"] = [
            {"id": s.id, "number": s.series_number, "modality": s.modality, "role": s.role,
             "description": dec(s.description_enc, column="series.description"), "instances": s.instance_count,
             "first_received_at": _ts(s.first_received_at), "last_received_at": _ts(s.last_received_at)}
            for s in repo_studies.series_of(session, study_id=study_id)]
        doc["associations"] = [
            {"id": a.id, "calling_aet": a.calling_aet, "peer": a.peer_host, "outcome": a.outcome,
             "instances": a.instances, "failures": a.failures, "started_at": _ts(a.started_at),
             "ended_at": _ts(a.ended_at)}
            for a in repo_studies.associations_of(session, study_id=study_id)]
        audit.append(session, kind="phi.view", actor=audit.operator(), subject=f"study:{study_id}", detail={})
    if json_out:
        print_json(doc)
        return
    say(f"study {doc['id']}  accession {doc['accession'] or '-'}  patient {doc['patient_id'] or '-'}  "
        f"date {doc['study_date'] or '-'}")
    say(f"state {doc['state']} (route {doc['route'] or '-'}, runs {doc['runs']})  calling AE "
        f"{doc['calling_aet']}  received {doc['first_received_at']} .. {doc['last_received_at']}  "
        f"ready {doc['ready_at'] or '-'}")
    table = Table("series", "no.", "modality", "role", "description", "instances", "last received (UTC)")
    for s in doc["series"]:
        add_row(table, s["id"], s["number"], s["modality"], s["role"], s["description"], s["instances"],
                s["last_received_at"])
    console.print(table)
    assoc = Table("association", "calling AE", "peer", "outcome", "instances", "failures", "started (UTC)")
    for a in doc["associations"]:
        add_row(assoc, a["id"][:12], a["calling_aet"], a["peer"], a["outcome"], a["instances"], a["failures"],
                a["started_at"])
    console.print(assoc)


@app.command()
def quarantine(
    ctx: typer.Context,
    reindex: Annotated[bool, typer.Option("--reindex", help="index them now (stop the dicom role first)")] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Received instances that could not be indexed (kept encrypted); --reindex after fixing the cause."""
    from msgate.listener import indexer
    from msgate.listener import quarantine as held

    store = state(ctx).store()
    docs = [r.doc() for r in indexer.reindex_quarantined(store, actor=audit.operator())] if reindex \
        else [e.doc() for e in held.entries(store.settings.home)]
    if json_out:
        print_json(docs)
    else:
        for d in docs:
            say(" ".join(f"{k} {v}" for k, v in d.items() if v not in (None, "", [])))
        if not docs:
            say("the quarantine is empty")
    if reindex and any(d["error"] for d in docs):
        raise typer.Exit(1)
