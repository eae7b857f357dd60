"""``msgate patients show ID [--at DATE]``: demographics and the EHR feature snapshot (audited PHI view)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from sqlmodel import select

from msgate.cli.common import fail, print_json, say, state
from msgate.storage import audit, repo_ehr
from msgate.storage.models import Patient, PatientIdentifier
from msgate.storage.repo_ehr import Identifier

app = typer.Typer(help="Patients from the HL7 feed and the feature snapshot the model would get.",
                  no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Patients (a group, so ``show`` stays a sub-command when more are added)."""


def _find(store: Any, session: Any, ident: str) -> Patient | None:
    if ident.isdigit():
        patient = session.get(Patient, int(ident))
        if patient is not None:
            return repo_ehr.survivor(session, patient)
    authority, _, value = ident.rpartition("|")
    return repo_ehr.find_patient(session, store.cipher, [Identifier(value=value, authority=authority)])


@app.command("show")
def show(
    ctx: typer.Context,
    ident: Annotated[str, typer.Argument(help="internal patient id, or MRN as AUTHORITY|MRN (or |MRN)")],
    at: Annotated[str | None, typer.Option("--at", help="snapshot date (YYYY-MM-DD); default now")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show one patient and the EHR feature snapshot at a date. The access is audited (phi.view)."""
    store = state(ctx).store()
    try:
        when = datetime.fromisoformat(at).replace(tzinfo=UTC) if at else datetime.now(UTC)
    except ValueError:
        fail("--at must be a date like 2025-01-31")
        return
    dec = store.cipher.decrypt
    with store.db.session() as session:
        patient = _find(store, session, ident)
        if patient is None:
            fail("no such patient")
            return
        ids = session.exec(select(PatientIdentifier).where(PatientIdentifier.patient_id == patient.id)).all()
        data = {
            "id": patient.id, "name": dec(patient.name_enc, column="patient.name"),
            "birth_date": dec(patient.birth_date_enc, column="patient.birth_date"),
            "sex": dec(patient.sex_enc, column="patient.sex"),
            "identifiers": [{"value": dec(i.value_enc, column="patient_identifier.value"), "authority": i.authority,
                             "type": i.id_type} for i in ids],
            "at": when, "features": repo_ehr.snapshot(session, store.cipher, patient, when),
        }
        audit.append(session, kind="phi.view", actor=audit.operator(), subject=f"patient:{patient.id}",
                     detail={"view": "patients.show", "at": when.isoformat()})
    if as_json:
        print_json(data)
        return
    for key in ("id", "name", "birth_date", "sex", "identifiers", "at"):
        say(f"{key:>12}: {data[key]}")
    for name, value in data["features"].items():
        shown = "-" if value is None else f"{value['value']} {value['unit']} ({value['observed_at'] or value['source']})"
        say(f"{name:>16}: {shown}")
