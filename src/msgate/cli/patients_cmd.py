"""``msgate patients show ID [--at DATE]``: demographics and the EHR feature snapshot (audited PHI view)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from sqlmodel import func, select

from msgate.cli.common import fail, print_json, say, state
from msgate.storage import audit, repo_ehr
from msgate.storage.models import Observation, Order, Patient, PatientIdentifier, Study
from msgate.storage.repo_ehr import Identifier

app = typer.Typer(help="Patients from the HL7 feed and the feature snapshot the model would get.",
                  no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Patients (a group, so ``show`` stays a sub-command when more are added)."""


Match = tuple[Patient, list[PatientIdentifier]]  # a patient and, for an MRN alone, the identifiers that matched


def _find(store: Any, session: Any, ident: str) -> list[Match]:
    """The patients ``ident`` names: ``id:N`` (an internal id), ``AUTHORITY|MRN`` (that identifier), ``|MRN``
    (the MRN under every assigning authority: operators know the MRN, rarely the CX-4 string the interface
    engine sent), or a bare value: an MRN, and an internal id too when it is all digits. Most MRNs are
    digits: a bare ``100234`` used to show internal patient 100234, whoever held MRN 100234; when it names
    two patients both are listed and the operator chooses."""
    if ident.lower().startswith("id:"):
        return _by_internal_id(session, ident[3:].strip())
    authority, _, value = ident.rpartition("|")
    if authority:
        found = repo_ehr.find_patient(session, store.cipher, [Identifier(value=value, authority=authority)])
        return [(found, [])] if found is not None else []
    matches = repo_ehr.patients_by_value(session, store.cipher, value)
    if "|" in ident:
        return matches
    by_id = _by_internal_id(session, ident)
    return matches + [m for m in by_id if m[0].id not in {p.id for p, _ in matches}]


def _by_internal_id(session: Any, text: str) -> list[Match]:
    if not text.isdigit():
        return []
    patient = session.get(Patient, int(text))
    return [(repo_ehr.survivor(session, patient), [])] if patient is not None else []


def _count(session: Any, table: Any, patient_id: int | None) -> int:
    return int(session.exec(select(func.count()).select_from(table).where(table.patient_id == patient_id)).one())


def _candidates(store: Any, session: Any, matches: list[Match]) -> list[dict[str, Any]]:
    """What tells the patients of one MRN apart: authority, demographics (decrypted for display) and how
    much each holds."""
    dec = store.cipher.decrypt
    return [{"id": p.id, "authorities": [{"authority": i.authority, "type": i.id_type} for i in rows],
             "name": dec(p.name_enc, column="patient.name"),
             "birth_date": dec(p.birth_date_enc, column="patient.birth_date"),
             "studies": _count(session, Study, p.id), "orders": _count(session, Order, p.id),
             "observations": _count(session, Observation, p.id)} for p, rows in matches]


def _print_candidates(candidates: list[dict[str, Any]], as_json: bool) -> None:
    """One line each, never wrapped at the terminal's width (the lines are meant to be compared)."""
    if as_json:
        print_json({"candidates": candidates})
        return
    for c in candidates:
        authorities = ", ".join(f"{a['authority'] or '(none)'} ({a['type']})" for a in c["authorities"])
        typer.echo(f"{c['id']:>8}  {authorities}  {c['name'] or '-'}  born {c['birth_date'] or '-'}  "
            f"studies={c['studies']} orders={c['orders']} observations={c['observations']}")


def _details(store: Any, session: Any, patient: Patient, when: datetime) -> dict[str, Any]:
    dec = store.cipher.decrypt
    ids = session.exec(select(PatientIdentifier).where(PatientIdentifier.patient_id == patient.id)).all()
    return {
        "id": patient.id, "name": dec(patient.name_enc, column="patient.name"),
        "birth_date": dec(patient.birth_date_enc, column="patient.birth_date"),
        "sex": dec(patient.sex_enc, column="patient.sex"),
        "identifiers": [{"value": dec(i.value_enc, column="patient_identifier.value"), "authority": i.authority,
                         "type": i.id_type} for i in ids],
        "at": when, "features": repo_ehr.snapshot(session, store.cipher, patient, when),
    }


@app.command("show")
def show(
    ctx: typer.Context,
    ident: Annotated[str, typer.Argument(help="id:N (internal patient id), AUTHORITY|MRN, |MRN (that MRN under any "
                                              "assigning authority), or a bare MRN or internal id")],
    at: Annotated[str | None, typer.Option("--at", help="snapshot date (YYYY-MM-DD); default now")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show one patient and the EHR feature snapshot at a date. The access is audited (phi.view).

    ``|MRN`` matches the MRN under every assigning authority; when several patients hold it (or a bare number
    is one patient's MRN and another's internal id), they are listed (also audited) and the command exits 2
    asking for ``AUTHORITY|MRN`` or ``id:N``."""
    store = state(ctx).store()
    try:
        when = datetime.fromisoformat(at).replace(tzinfo=UTC) if at else datetime.now(UTC)
    except ValueError:
        fail("--at must be a date like 2025-01-31")
        return
    candidates: list[dict[str, Any]] = []
    data: dict[str, Any] = {}
    with store.db.session() as session:
        matches = _find(store, session, ident)
        if not matches:
            fail("no such patient")
            return
        if len(matches) > 1:
            candidates = _candidates(store, session, matches)
            audit.append(session, kind="phi.view", actor=audit.operator(), subject="patients:candidates",
                         detail={"view": "patients.show.candidates", "patient_ids": [c["id"] for c in candidates],
                                 "count": len(candidates)})
        else:
            data = _details(store, session, matches[0][0], when)
            audit.append(session, kind="phi.view", actor=audit.operator(), subject=f"patient:{data['id']}",
                         detail={"view": "patients.show", "at": when.isoformat()})
    if candidates:
        _print_candidates(candidates, as_json)
        fail(f"{len(candidates)} patients match {'this MRN' if '|' in ident else 'this value'} (an MRN under "
             "different assigning authorities, or an MRN and an internal id): give AUTHORITY|MRN or id:N", code=2)
        return
    if as_json:
        print_json(data)
        return
    for key in ("id", "name", "birth_date", "sex", "identifiers", "at"):
        say(f"{key:>12}: {data[key]}")
    for name, value in data["features"].items():
        shown = "-" if value is None else f"{value['value']} {value['unit']} ({value['observed_at'] or value['source']})"
        say(f"{name:>16}: {shown}")
