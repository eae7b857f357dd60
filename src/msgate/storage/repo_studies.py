"""Queries and state changes on studies, series and associations (listener, readiness, operator views).

Study states: ``receiving`` -> ``ready`` (pipeline route, required roles present) | ``stable`` (quiet
period over, required roles missing) | ``stored`` (store-only route) | ``ignored`` (ignore route);
a later instance turns any of them back into ``receiving`` (``runs`` keeps counting readiness runs,
and each run's ``study.ready`` audit event stays in the chain).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from msgate.storage import audit
from msgate.storage.models import Association, Instance, Series, Study, utcnow

FINAL_STATES = frozenset({"ready", "stable", "stored", "ignored"})


@dataclass(frozen=True)
class OpenStudy:
    study_id: int
    last_received_at: datetime | None


def open_association(session: Session, *, assoc_id: str, calling_aet: str, peer_host: str) -> None:
    session.add(Association(id=assoc_id, calling_aet=calling_aet[:16], peer_host=peer_host[:64]))


def close_association(session: Session, *, assoc_id: str, outcome: str, instances: int, failures: int) -> None:
    row = session.get(Association, assoc_id)
    if row is None:
        return
    row.ended_at, row.outcome, row.instances, row.failures = utcnow(), outcome[:16], instances, failures
    session.add(row)


def set_series_role(session: Session, *, series_id: int, role: str) -> None:
    series = session.get(Series, series_id)
    if series is not None and series.role != role:
        series.role = role[:16]
        session.add(series)


def set_study_route(session: Session, *, study_id: int, route: str) -> None:
    study = session.get(Study, study_id)
    if study is not None and study.route != route:
        study.route = route[:32]
        session.add(study)


def series_of(session: Session, *, study_id: int) -> list[Series]:
    return list(session.exec(select(Series).where(Series.study_id == study_id)
                             .order_by(col(Series.series_number), col(Series.id))).all())


def study_state(session: Session, *, study_id: int) -> str | None:
    study = session.get(Study, study_id)
    return None if study is None else study.state


def receiving_studies(session: Session) -> list[OpenStudy]:
    rows = session.exec(select(Study).where(Study.state == "receiving")).all()
    return [OpenStudy(s.id, s.last_received_at) for s in rows if s.id is not None]


def reopen(session: Session, *, study_id: int, actor: str = "listener") -> bool:
    """A new instance for a finished study: back to ``receiving``; earlier runs stay recorded."""
    study = session.get(Study, study_id)
    if study is None or study.state not in FINAL_STATES:
        return False
    previous = study.state
    study.state = "receiving"
    session.add(study)
    audit.append(session, kind="study.reopened", actor=actor, subject=f"study:{study_id}",
                 detail={"from": previous, "runs": study.runs})
    return True


def finish(session: Session, *, study_id: int, state: str, reason: str, roles: list[str],
           missing: list[str], actor: str = "listener") -> int | None:
    """Record a readiness decision; returns the run number for ``ready``, else None."""
    study = session.get(Study, study_id)
    if study is None or study.state != "receiving":
        return None
    study.state = state
    run: int | None = None
    if state == "ready":
        study.runs += 1
        study.ready_at = utcnow()
        run = study.runs
    session.add(study)
    audit.append(session, kind=f"study.{state}", actor=actor, subject=f"study:{study_id}",
                 detail={"reason": reason, "roles": sorted(roles), "missing": sorted(missing), "run": run,
                         "route": study.route})
    return run


def list_studies(session: Session, *, state: str | None = None, limit: int = 200) -> list[Study]:
    query = select(Study).order_by(col(Study.id).desc()).limit(limit)
    if state:
        query = query.where(Study.state == state)
    return list(session.exec(query).all())


def associations_of(session: Session, *, study_id: int) -> list[Association]:
    """The associations that delivered instances of a study (through ``instance.assoc_id``)."""
    ids = select(Instance.assoc_id).where(Instance.study_id == study_id).distinct()
    return list(session.exec(select(Association).where(col(Association.id).in_(ids))
                             .order_by(col(Association.started_at))).all())
