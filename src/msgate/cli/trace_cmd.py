"""``msgate trace ID``: the timeline of one accession, study UID, job id, outbox entry or HL7 control id.

association -> instances -> HL7 messages -> readiness -> job stages -> SR/ORU attempts and
acknowledgements. Lookups go through the blind indexes; a control id is matched by decrypting the
recent messages' MSH-10 in memory. An outbox entry is named by its id or a prefix of it (as ``outbox list``
shows it), or by the MSH-10 of an ORU the outbox sent (:func:`msgate.results.control_ids.control_id`), and
followed to its job and study. An order message (ORM/OMI/OMG) is followed to its order rows and on to
the studies the worker links to them (:func:`msgate.workers.ehr.link`), their jobs and outbox. The trace
itself is audited.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlmodel import Session, col, func, select

from msgate.cli.common import add_row, console, err_console, fail, print_json, state
from msgate.errors import CryptoError
from msgate.hl7.mapping import ORDER_TYPES, order_groups, order_index  # the mapping's own order keys
from msgate.hl7.parse import Message, ParseError, parse
from msgate.storage import audit, repo_ehr
from msgate.storage.models import (
    Association,
    Hl7Message,
    Instance,
    Job,
    Order,
    OutboxAttempt,
    OutboxEntry,
    Patient,
    Series,
    Study,
)
from msgate.storage.store import Store
from msgate.workers import ehr

CONTROL_ID_SCAN = 20_000  # control ids are encrypted with no blind index: the newest N are decrypted
MIN_PREFIX = 6  # job and outbox entry ids (uuid4 hex) are matched by prefix from this length on
OUTBOUND_CONTROL_ID = re.compile(r"MG([0-9a-f]{14})\d{4}", re.IGNORECASE)  # results/control_ids.control_id
ORDER_MESSAGES = frozenset(mtype for mtype, _ in ORDER_TYPES)  # what hl7/mapping.py maps to orders


def find_studies(store: Store, session: Session, ident: str,
                 scan: int = CONTROL_ID_SCAN) -> tuple[list[Study], list[Hl7Message], list[Job]]:
    """Resolve ``ident`` as a study UID, accession, job id or HL7 control id (among the newest ``scan``
    messages; 0: all)."""
    idx = store.cipher.blind_index
    studies = list(session.exec(select(Study).where(Study.study_uid_index == idx(ident, scope="study"))).all())
    studies += session.exec(select(Study).where(Study.accession_index == idx(ident, scope="accession"))).all()
    jobs = (list(session.exec(select(Job).where(col(Job.id).startswith(ident.lower()))).all())
            if len(ident) >= MIN_PREFIX else [])
    for job in jobs:
        study = session.get(Study, job.study_id)
        if study is not None and study not in studies:
            studies.append(study)
    newest = select(Hl7Message).order_by(col(Hl7Message.id).desc())
    messages = [m for m in session.exec(newest.limit(scan) if scan else newest)
                if store.cipher.decrypt(m.control_id_enc, column="hl7.control_id") == ident]
    return studies, messages, jobs


def find_entries(session: Session, ident: str) -> list[OutboxEntry]:
    """Outbox entries ``ident`` names: an entry id, a prefix of one (:data:`MIN_PREFIX` characters at least),
    or the MSH-10 of an ORU sent for one (``MG`` + its first 14 characters + the copy number). A prefix may
    name several (the caller asks for more of it)."""
    outbound = OUTBOUND_CONTROL_ID.fullmatch(ident)
    prefix = (outbound.group(1) if outbound else ident).lower()
    if len(prefix) < MIN_PREFIX:
        return []
    exact = session.get(OutboxEntry, prefix)
    if exact is not None:
        return [exact]
    return list(session.exec(select(OutboxEntry).where(col(OutboxEntry.id).startswith(prefix, autoescape=True))
                             .order_by(col(OutboxEntry.created_at))).all())


def entry_candidates(entries: list[OutboxEntry], json_out: bool) -> None:
    """The entries an ambiguous prefix names (ids, jobs, destinations, states: no PHI), then exit 2."""
    docs = [{"id": e.id, "job_id": e.job_id, "kind": e.kind, "destination": e.destination, "state": e.state,
             "created_at": e.created_at.isoformat()} for e in entries]
    if json_out:
        print_json(docs)
    else:
        table = Table("id", "job", "kind", "destination", "state", "created (UTC)")
        for d in docs:
            add_row(table, d["id"][:16], (d["job_id"] or "")[:12], d["kind"], d["destination"], d["state"],
                    when(d["created_at"]))
        console.print(table)
    fail(f"that id matches several ({len(entries)}) outbox entries; give more of the entry id", code=2)


def entry_studies(session: Session, entries: list[OutboxEntry]) -> list[Study]:
    """The studies of the entries' jobs."""
    out: list[Study] = []
    for entry in entries:
        job = session.get(Job, entry.job_id) if entry.job_id else None
        study = session.get(Study, job.study_id) if job is not None else None
        if study is not None and study not in out:
            out.append(study)
    return out


def _order_keys(store: Store, session: Session, msg: Hl7Message) -> list[list[tuple[Any, str]]]:
    """Per ORC group of the stored message, its (order column, blind index) pairs in the order the mapping
    tries them. Nothing when the body cannot be read (purged) or parsed."""
    try:
        parsed: Message = parse(store.blobs.read(session, msg.blob_id))
    except (CryptoError, OSError, ParseError):
        return []
    out = []
    for group in order_groups(parsed.segments):
        keys = [(Order.placer_index, order_index(store, group.placer[0], "placer", group.placer[1])),
                (Order.filler_index, order_index(store, group.filler[0], "filler", group.filler[1])),
                (Order.accession_index, order_index(store, group.accession, "accession"))]
        out.append([(column, index) for column, index in keys if index])
    return out


def _survivor_id(session: Session, patient_id: int | None) -> int | None:
    patient = session.get(Patient, patient_id) if patient_id is not None else None
    return repo_ehr.survivor(session, patient).id if patient is not None else None


def message_orders(store: Store, session: Session, msg: Hl7Message) -> list[Order]:
    """The order rows an order message wrote. ``Order.message_id`` names only the last message that touched
    an order, so a first NW later updated by a status message is found by the numbers it carries, keyed as
    the mapping keys them (placer, else filler, else accession); another patient's order with the same number
    is not this message's."""
    if msg.message_type.upper() not in ORDER_MESSAGES:
        return []
    orders = {o.id: o for o in session.exec(select(Order).where(Order.message_id == msg.id)).all()}
    owner = _survivor_id(session, msg.patient_id)
    for keys in _order_keys(store, session, msg):
        for column, index in keys:
            found = [o for o in session.exec(select(Order).where(col(column) == index).order_by(col(Order.id))).all()
                     if owner is None or _survivor_id(session, o.patient_id) in (None, owner)]
            if found:
                orders.setdefault(found[0].id, found[0])
                break
    return [orders[k] for k in sorted(orders, key=lambda k: k or 0)]


def order_studies(store: Store, session: Session, order: Order) -> list[Study]:
    """Studies the worker links to ``order`` (:func:`msgate.workers.ehr.link`: the accession number, of the
    same patient), or whose jobs ran with it (the link may have moved to a newer order since)."""
    if not order.accession_index:
        return []
    out = []
    for study in session.exec(select(Study).where(Study.accession_index == order.accession_index)
                              .order_by(col(Study.id))).all():
        jobs = session.exec(select(Job).where(Job.study_id == study.id)).all()
        if (ehr.link(session, study, store.cipher).order_id == order.id
                or any((job.flags or {}).get("order_id") == order.id for job in jobs)):
            out.append(study)
    return out


def order_events(order: Order, studies: list[Study]) -> list[dict[str, Any]]:
    linked = ", ".join(f"study:{s.id}" for s in studies) or "no study linked"
    return [_event(order.updated_at, "hl7", f"order {order.status or '-'}: {linked}", f"order:{order.id}")]


def _event(ts: datetime | None, stage: str, what: str, ref: str = "") -> dict[str, Any]:
    return {"time": ts.isoformat() if ts else None, "stage": stage, "event": what, "ref": ref}


def study_events(store: Store, session: Session, study: Study) -> list[dict[str, Any]]:
    sid = study.id
    events = [_event(study.first_received_at, "dicom", f"study first instance (state now {study.state})",
                     f"study:{sid}")]
    assoc_ids = session.exec(select(Instance.assoc_id).where(Instance.study_id == sid).distinct()).all()
    for assoc in session.exec(select(Association).where(col(Association.id).in_([a for a in assoc_ids if a]))):
        events.append(_event(assoc.started_at, "dicom", f"association from {assoc.calling_aet}: "
                             f"{assoc.instances} stored, {assoc.failures} failed", f"assoc:{assoc.id[:8]}"))
        if assoc.ended_at:
            events.append(_event(assoc.ended_at, "dicom", f"association {assoc.outcome}", f"assoc:{assoc.id[:8]}"))
    for series in session.exec(select(Series).where(Series.study_id == sid)):
        events.append(_event(series.last_received_at, "dicom", f"series {series.series_number or '?'} "
                             f"role {series.role or '-'}: {series.instance_count} instances", f"series:{series.id}"))
    if study.ready_at:
        events.append(_event(study.ready_at, "ready", f"study ready (runs {study.runs})", f"study:{sid}"))
    if study.accession_index:
        for order in session.exec(select(Order).where(Order.accession_index == study.accession_index)):
            msg = session.get(Hl7Message, order.message_id) if order.message_id else None
            if msg is not None:
                events.extend(message_events(msg))
    if study.patient_id:
        for msg in session.exec(select(Hl7Message).where(Hl7Message.patient_id == study.patient_id)):
            events.extend(message_events(msg))
    for job in session.exec(select(Job).where(Job.study_id == sid)):
        events.extend(job_events(session, job))
    return events


def message_events(msg: Hl7Message) -> list[dict[str, Any]]:
    kind = f"{msg.message_type}^{msg.trigger}".strip("^")
    events = [_event(msg.received_at, "hl7", f"{kind} v{msg.version} from {msg.sending_application}",
                     f"hl7:{msg.id}")]
    if msg.ack_at:
        events.append(_event(msg.ack_at, "hl7", f"ACK {msg.ack_code}", f"hl7:{msg.id}"))
    events.append(_event(msg.received_at, "hl7", f"mapping {msg.mapping_state}"
                         + (f": {msg.mapping_error}" if msg.mapping_error else ""), f"hl7:{msg.id}"))
    return events


def stage_text(name: str, value: Any) -> str:
    """One ``Job.stages`` entry with its unit: ``*_ms`` are milliseconds, ``batch`` is a count."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} {value}"
    if name.endswith("_ms"):
        return f"{name.removesuffix('_ms')} {value:.1f} ms"
    if name == "batch":
        return f"batch size {value:g}"
    return f"{name} {value:g}"


def job_events(session: Session, job: Job) -> list[dict[str, Any]]:
    ref = f"job:{job.id[:8]}"
    events = [_event(job.created_at, "job", f"job created (model {job.model_version or '?'})", ref)]
    for label, ts in (("published to the queue", job.published_at), ("started", job.started_at),
                      (f"finished: {job.state}", job.finished_at)):
        if ts:
            events.append(_event(ts, "job", label, ref))
    if job.stages:
        stages = ", ".join(stage_text(k, v) for k, v in job.stages.items())
        events.append(_event(job.finished_at or job.started_at, "job", f"stages: {stages}", ref))
    if job.error:
        events.append(_event(job.finished_at, "job", f"error: {job.error}", ref))
    for entry in session.exec(select(OutboxEntry).where(OutboxEntry.job_id == job.id)):
        events.extend(entry_events(session, entry))
    return events


def entry_events(session: Session, entry: OutboxEntry) -> list[dict[str, Any]]:
    out_ref = f"outbox:{entry.id[:8]}"
    events = [_event(entry.created_at, "result", f"{entry.kind} to {entry.destination} queued", out_ref)]
    for attempt in session.exec(select(OutboxAttempt).where(OutboxAttempt.entry_id == entry.id)):
        events.append(_event(attempt.started_at, "result", f"attempt {attempt.outcome}: "
                             f"{attempt.peer_status} {attempt.detail}".strip(), out_ref))
    if entry.delivered_at:
        events.append(_event(entry.delivered_at, "result", f"{entry.kind} delivered", out_ref))
    return events


def resolve(store: Store, session: Session, ident: str, json_out: bool,
            scan: int = CONTROL_ID_SCAN) -> tuple[list[Study], list[Hl7Message], list[OutboxEntry]]:
    """The studies, HL7 messages and outbox entries ``ident`` names (an entry's job's study among the
    studies); nothing found exits 1. A prefix of several entries lists them and exits 2 when that is all it
    names (or it is the MSH-10 of an ORU msgate sent); an id that also names a study, job or message traces
    that, with a note on the entries."""
    studies, messages, jobs = find_studies(store, session, ident, scan)
    entries = find_entries(session, ident)
    if len(entries) > 1:
        if OUTBOUND_CONTROL_ID.fullmatch(ident) or not (studies or messages or jobs):
            entry_candidates(entries, json_out)
        err_console.print(f"note: that id also starts {len(entries)} outbox entries; give more of an entry id "
                          "to trace one", markup=False, highlight=False)
        entries = []
    if not (studies or messages or jobs or entries):
        total = session.exec(select(func.count()).select_from(Hl7Message)).one()
        searched = (f"; HL7 control ids of the newest {scan} of {total} messages only: --scan 0 searches them all"
                    if scan and total > scan else "")
        fail(f"nothing found for that id (accession, study UID, job id, outbox entry or HL7 control id{searched})")
    studies += [s for s in entry_studies(session, entries) if s not in studies]
    return studies, messages, entries


def command(
    ctx: typer.Context,
    ident: Annotated[str, typer.Argument(metavar="ID", help="accession, study UID, job id (prefix), outbox entry id "
                                         "(prefix) or HL7 control id (received, or of an ORU msgate sent)")],
    json_out: Annotated[bool, typer.Option("--json")] = False,
    scan: Annotated[int, typer.Option("--scan", min=0, help="HL7 control ids are looked for among the newest N "
                                      "messages received (decrypted one by one); 0: all of them")] = CONTROL_ID_SCAN,
) -> None:
    """Timeline of one accession, study, job, outbox entry or HL7 message, from association to acknowledgements.

    A prefix that names several outbox entries, and nothing else, lists them and exits 2."""
    store = state(ctx).store()
    with store.db.session() as session:
        studies, messages, entries = resolve(store, session, ident, json_out, scan)
        events: list[dict[str, Any]] = []
        for entry in entries:  # also an entry whose job is gone, or that has none
            events += entry_events(session, entry)
        orders = list({o.id: o for msg in messages for o in message_orders(store, session, msg)}.values())
        for order in orders:
            linked = order_studies(store, session, order)
            studies += [s for s in linked if s not in studies]
            events += order_events(order, linked)
        for study in studies:
            events += study_events(store, session, study)
        for msg in messages:
            events += message_events(msg)
        unique = {(e["time"], e["stage"], e["event"], e["ref"]): e for e in events}
        timeline = sorted(unique.values(), key=lambda e: e["time"] or "")
        detail: dict[str, Any] = {"orders": [o.id for o in orders]} if orders else {}
        if entries:
            detail["outbox"] = [e.id for e in entries]
        subject = (",".join(f"study:{s.id}" for s in studies)
                   or ",".join(f"outbox:{e.id}" for e in entries) or "hl7")
        audit.append(session, kind="operator.trace", actor=audit.operator(), subject=subject, detail=detail or None)
    if json_out:
        print_json({"studies": [s.id for s in studies], "orders": [o.id for o in orders],
                    "outbox": [e.id for e in entries], "events": timeline})
        return
    table = Table("time (UTC)", "stage", "event", "ref")
    for e in timeline:
        add_row(table, when(e["time"]), e["stage"], e["event"], e["ref"])
    console.print(table)


def when(iso: str | None) -> str:
    """``2025-03-04 11:23:05.123`` in UTC. The table showed the time of day only, so retries days apart
    read as one afternoon."""
    if not iso:
        return ""
    ts = datetime.fromisoformat(iso)
    ts = ts.astimezone(UTC) if ts.tzinfo is not None else ts  # naive: stored as UTC
    return ts.strftime("%Y-%m-%d %H:%M:%S.") + f"{ts.microsecond // 1000:03d}"
