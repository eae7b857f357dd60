"""``msgate messages list|show|replay``: the HL7 feed as an operator sees it (no payloads shown).

The control id (MSH-10) is shown decrypted: senders often build it from the MRN, so every display is
recorded in the audit chain (``phi.view``), as ``studies list`` does."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer
from sqlmodel import col, select

from msgate.cli.common import console, fail, print_json, say, state
from msgate.storage import audit
from msgate.storage.models import Hl7Message
from msgate.storage.store import Store

MappingState = Literal["pending", "mapped", "skipped", "error"]  # Hl7Message.mapping_state (hl7/mapping.py)
app = typer.Typer(help="Inbound HL7 messages: type, control id, received, ACK, mapping and validation.",
                  no_args_is_help=True)


def _row(store: Store, m: Hl7Message, detail: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": m.id, "type": f"{m.message_type}^{m.trigger}".rstrip("^"), "version": m.version,
        "control_id": store.cipher.decrypt(m.control_id_enc, column="hl7.control_id"),
        "sending_application": m.sending_application, "sending_facility": m.sending_facility,
        "received_at": m.received_at, "ack": m.ack_code, "ack_at": m.ack_at, "mapping_state": m.mapping_state,
        "mapping_error": m.mapping_error, "duplicates": m.duplicates,
        "findings": len((m.validation or {}).get("findings", [])),
    }
    if detail:
        out["validation"] = m.validation
        out["patient_id"] = m.patient_id
        out["blob_id"] = m.blob_id
    return out


@app.command("list")
def list_messages(
    ctx: typer.Context,
    state_filter: Annotated[MappingState | None, typer.Option("--state", help="only messages in this mapping "
                                                              "state")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The most recent messages, newest first."""
    store = state(ctx).store()
    with store.db.session() as session:
        query = select(Hl7Message).order_by(col(Hl7Message.id).desc()).limit(limit)
        if state_filter:
            query = query.where(Hl7Message.mapping_state == state_filter)
        rows = [_row(store, m) for m in session.exec(query).all()]
        if rows:  # the control id is stored encrypted: senders put MRNs in it; every display is audited
            audit.append(session, kind="phi.view", actor=audit.operator(), subject="messages:list",
                         detail={"message_ids": [r["id"] for r in rows], "count": len(rows)})
    if as_json:
        print_json(rows)
        return
    for r in rows:
        say(f"{r['id']:>6}  {r['type']:<12} {r['control_id'] or '':<24} "
            f"{r['received_at']:%Y-%m-%d %H:%M:%S}  ack={r['ack'] or '-':<3} {r['mapping_state']:<8} "
            f"{r['mapping_error'] or ''}  findings={r['findings']}")


@app.command("show")
def show(ctx: typer.Context, message_id: int, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One message's header, ACK, mapping state and validation findings."""
    store = state(ctx).store()
    with store.db.session() as session:
        m = session.get(Hl7Message, message_id)
        if m is None:
            fail(f"no message {message_id}")
            return
        data = _row(store, m, detail=True)
        audit.append(session, kind="phi.view", actor=audit.operator(), subject=f"message:{message_id}", detail={})
    if as_json:
        print_json(data)
        return
    for key, value in data.items():
        say(f"{key:>20}: {value}")


@app.command("replay")
def replay(
    ctx: typer.Context,
    message_id: Annotated[int | None, typer.Argument(help="one message; omit with --errors")] = None,
    errors: Annotated[bool, typer.Option("--errors", help="every message in the error state")] = False,
) -> None:
    """Map stored messages again (after fixing the cause of a mapping error)."""
    from msgate.hl7.mapping import map_messages

    store = state(ctx).store()
    with store.db.session() as session:
        if message_id is not None:
            if session.get(Hl7Message, message_id) is None:
                fail(f"no message {message_id}")
                return
            ids = [message_id]
        elif errors:
            ids = [i for i in session.exec(select(Hl7Message.id).where(Hl7Message.mapping_state == "error")).all()
                   if i is not None]
        else:
            fail("give a message id or --errors")
            return
        if not ids:
            console.print("no messages in the error state; nothing replayed")
            return
        audit.append(session, kind="hl7.replay", actor=audit.operator(), subject="hl7", detail={"count": len(ids)})
    outcomes = map_messages(store, ids)
    for mid, outcome in outcomes.items():
        say(f"{mid}: {outcome.state} {outcome.error or ''}")
