"""Study tracking and readiness: which studies are receiving, and when each one is complete.

A study is *ready* (pipeline route) as soon as every association that delivered to it is released and
every required role (FLAIR by default) is present; otherwise, once no instance has arrived for
``quiet_seconds``, it is ``ready`` if the roles are there, else ``stable`` (incomplete). Store-only
and ignored studies end as ``stored`` / ``ignored``. A later instance reopens a finished study.

An instance that moved its series from another study (a PACS merge or split, ``StoredInstance.moved_from``)
counts as an arrival for that study too: it is decided again without the series (the indexer reopened it),
on the same release or quiet period.

A routing rule's ``await_roles`` hold a release back: with every required role present but an awaited
one (QSM) absent, the study keeps receiving until the quiet period (then ``ready``, reason ``quiet``,
without it) or until a later release finds it present (``ready`` at once). One run with the QSM instead of
a FLAIR-only run and a correction when a router sends each series on its own association. The ready
decision of a study that was held, or that ends without an awaited role, carries a ``study.awaited``
audit event (roles only). An abort's longer wait (:data:`ABORTED_QUIET_FACTOR`) applies as before: the
hold ends at the quiet period in force, six of them after an abort.

Decisions run on one tracker thread, woken at once by a release, so readiness follows a release
within milliseconds. Ready studies go to the scheduler hooks (:meth:`Tracker.add_hook`) after the
state change is committed (state, ``ready_at``, ``runs`` and a ``study.ready`` audit event).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlmodel import Session

from msgate.listener import rules as rules_mod
from msgate.storage import audit, repo_studies
from msgate.storage.index_dicom import HeaderLike, StoredInstance
from msgate.storage.models import Study
from msgate.storage.store import Store

log = logging.getLogger(__name__)

ENDED_REMEMBERED = 4096  # association ids whose end was seen, so a late instance cannot re-register them
# An aborted association (a sender that crashed, a network cut) usually left its series half sent, and the
# sender retries: its studies wait this many quiet periods, not one. After one, the model ran on half a
# FLAIR and the retry then sent a correction.
ABORTED_QUIET_FACTOR = 6


@dataclass(frozen=True)
class ReadyStudy:
    """What a scheduler hook receives."""

    study_id: int
    run: int
    reason: str  # "released" or "quiet"
    roles: tuple[str, ...]


ReadyHook = Callable[[ReadyStudy], None]


@dataclass
class _Active:
    last: float
    arrivals: int = 0  # instances stored since tracking began: a decision is undone only by a new one
    route: str | None = None
    required: tuple[str, ...] = ()
    assocs: set[str] = field(default_factory=set)
    released_pending: bool = False
    aborted: bool = False  # its last association ended by an abort, and nothing arrived since
    held: bool = False  # a release was held back for awaited roles (routing rule ``await_roles``)


class Tracker:
    """In-process view of the receiving studies; the database stays the source of truth."""

    def __init__(self, store: Store, *, quiet_seconds: float, rules: rules_mod.ListenerRules) -> None:
        self.store, self.quiet, self.rules = store, quiet_seconds, rules
        self._active: dict[int, _Active] = {}
        self._by_assoc: dict[str, set[int]] = {}
        self._lock = threading.Condition()
        self._hooks: list[ReadyHook] = []
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()  # recent, bounded

    def add_hook(self, hook: ReadyHook) -> None:
        """Register a scheduler hook, called with each ReadyStudy after its state is committed."""
        self._hooks.append(hook)

    # --- called from association threads -----------------------------------------------------------

    def instance_stored(self, stored: StoredInstance, header: HeaderLike, *, assoc_id: str, calling_aet: str) -> None:
        """Index-side bookkeeping after a commit: role, route, reopening; memory-only on the hot path.

        The study is tracked first: if recording its role or route fails (database unavailable), the
        readiness decision classifies the series from their rows, and the study still finishes."""
        with self._lock:
            if stored.duplicate and stored.study_id not in self._active:
                return  # a re-send of what the study already has does not reopen it
            fresh = self._arrived(stored.study_id, assoc_id)
            if stored.moved_from is not None:  # the study its series left: decided again without it
                self._arrived(stored.moved_from, assoc_id)
        if stored.new_series or stored.new_study:
            try:
                self._classify(stored, header, calling_aet)
            except Exception:
                log.exception("series role not recorded; decided from the index at readiness",
                              extra={"study_id": stored.study_id})
        if fresh and not stored.new_study:
            with self.store.db.session() as session:
                if repo_studies.reopen(session, study_id=stored.study_id):
                    log.info("study reopened", extra={"study_id": stored.study_id})

    def _arrived(self, study_id: int, assoc_id: str) -> bool:
        """Track an arrival for ``study_id`` (under the lock); True when it was not being tracked."""
        entry = self._active.get(study_id)
        fresh = entry is None
        if entry is None:
            entry = self._active[study_id] = _Active(last=time.monotonic())
        entry.last = time.monotonic()
        entry.arrivals += 1
        entry.aborted = False
        if assoc_id not in self._ended:  # an instance answered after its association's end (a retry)
            entry.assocs.add(assoc_id)  # must not keep the study waiting for that association forever
            self._by_assoc.setdefault(assoc_id, set()).add(study_id)
        return fresh

    def _classify(self, stored: StoredInstance, header: HeaderLike, calling_aet: str) -> None:
        decision = rules_mod.decide(header.dataset(), self.rules, calling_aet)
        with self.store.db.session() as session:  # study row before series row, as the indexer locks them:
            if stored.new_study:  # the other order deadlocked with it on PostgreSQL (one side aborted)
                repo_studies.set_study_route(session, study_id=stored.study_id, route=decision.route)
            if stored.new_series:
                repo_studies.set_series_role(session, series_id=stored.series_id, role=decision.role.value)

    def association_ended(self, assoc_id: str, *, released: bool) -> None:
        """A release may make its studies ready now; an abort leaves them to a longer quiet period
        (:data:`ABORTED_QUIET_FACTOR`), ended by any instance that arrives."""
        with self._lock:
            self._ended[assoc_id] = None
            while len(self._ended) > ENDED_REMEMBERED:
                self._ended.popitem(last=False)
            for study_id in self._by_assoc.pop(assoc_id, set()):
                entry = self._active.get(study_id)
                if entry is not None:
                    entry.assocs.discard(assoc_id)
                    entry.released_pending = released and not entry.assocs
                    entry.aborted = not released
            self._lock.notify_all()

    # --- the tracker thread ------------------------------------------------------------------------

    def load_open(self) -> None:
        """After a restart: studies still receiving are tracked from their last arrival time."""
        with self.store.db.session() as session:
            rows = repo_studies.receiving_studies(session)
        now_wall, now_mono = datetime.now(UTC), time.monotonic()
        with self._lock:
            for row in rows:
                age = (now_wall - row.last_received_at).total_seconds() if row.last_received_at else self.quiet
                self._active.setdefault(row.study_id, _Active(last=now_mono - max(0.0, age)))

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._lock:
                self._lock.wait(timeout=min(0.25, self.quiet / 4))
                now = time.monotonic()
                due = [(sid, "quiet" if now - e.last >= self._quiet(e) else "released", e.arrivals)
                       for sid, e in self._active.items()
                       if now - e.last >= self._quiet(e) or (e.released_pending and not e.assocs)]
                for sid, _, _ in due:
                    self._active[sid].released_pending = False
            for study_id, reason, seen in due:
                try:
                    self._evaluate(study_id, reason, seen)
                except Exception:
                    log.exception("readiness check failed", extra={"study_id": study_id})

    def _quiet(self, entry: _Active) -> float:
        return self.quiet * ABORTED_QUIET_FACTOR if entry.aborted else self.quiet

    def _evaluate(self, study_id: int, reason: str, seen: int) -> None:
        with self._lock:
            tracked = self._active.get(study_id)
            held = tracked is not None and tracked.held
        with self.store.db.session() as session:
            rule = self._rule_for(session, study_id)
            roles = self._roles(session, study_id)
            pipeline = rule.action == "pipeline"
            missing = [r.value for r in rule.required_roles if r.value not in roles] if pipeline else []
            absent = rules_mod.awaited_absent(rule.await_roles, roles) if pipeline else []
            if pipeline:
                if missing:
                    state = "stable" if reason == "quiet" else ""
                else:
                    state = "" if absent and reason == "released" else "ready"
            else:
                state = "ignored" if rule.action == "ignore" else "stored"
            if not state:  # released with roles missing, or awaited ones absent: wait for the quiet period
                if not missing:
                    self._hold(study_id, absent)
                return
            # Instances arrived since the last decision: if that decision's reopen is not committed yet
            # (another thread), reopen here, in the same transaction as the new decision.
            repo_studies.reopen(session, study_id=study_id)
            run = repo_studies.finish(session, study_id=study_id, state=state, reason=reason,
                                      roles=sorted(roles), missing=missing)
            awaited = run is not None and bool(rule.await_roles) and (held or bool(absent))
            if awaited:
                audit.append(session, kind="study.awaited", actor="listener", subject=f"study:{study_id}",
                             detail={"run": run, "reason": reason, "held": held, "absent": absent,
                                     "await_roles": sorted(r.value for r in rule.await_roles)})
        if awaited:
            log.info("awaited roles absent at the quiet period" if absent else "awaited roles arrived",
                     extra={"study_id": study_id, "reason": reason, "role": ",".join(absent), "count": len(absent)})
        with self._lock:
            entry = self._active.get(study_id)
            # Only an instance stored since ``seen`` undoes the decision. An association still open but
            # idle past the quiet period does not: it used to reopen the study at once, and the next
            # turn made it ready again, a new run every 0.25 s until the association ended.
            arrived_since = entry is not None and entry.arrivals != seen
            if entry is not None and not arrived_since:
                del self._active[study_id]
        if arrived_since:  # an instance raced the decision: the study is receiving again
            with self.store.db.session() as session:
                repo_studies.reopen(session, study_id=study_id)
        log.info("study finished", extra={"study_id": study_id, "state": state, "reason": reason})
        if run is not None:
            ready = ReadyStudy(study_id, run, reason, tuple(sorted(roles)))
            for hook in self._hooks:
                try:
                    hook(ready)
                except Exception:
                    log.exception("scheduler hook failed", extra={"study_id": study_id})

    def _hold(self, study_id: int, absent: list[str]) -> None:
        """A release found every required role but not the awaited ones: keep the study receiving; the
        quiet period (from its last instance) or a later release decides it."""
        with self._lock:
            entry = self._active.get(study_id)
            if entry is not None:
                entry.held = True
        log.info("study held for awaited roles", extra={"study_id": study_id, "role": ",".join(absent)})

    def _rule_for(self, session: Session, study_id: int) -> rules_mod.RoutingRule:
        """Route the study from its stored attributes (the current rules; recorded in ``study.route``).

        The modality is the first *image* modality received: routing on the first one made an MR study
        whose key-object selection, SR or presentation state arrived first ``store_only``, never run."""
        study = session.get(Study, study_id)
        if study is None:
            return rules_mod.RoutingRule(name="missing", action="store_only", required_roles=[])
        series = repo_studies.series_of(session, study_id=study_id)
        modalities = [m for m in study.modalities.split(",") if m]
        images = [m for m in modalities if m.upper() not in rules_mod.NON_IMAGE_MODALITIES]
        image_series = [s for s in series if s.modality.upper() not in rules_mod.NON_IMAGE_MODALITIES]
        fields = rules_mod.StudyFields(
            modality=(images or modalities or [""])[0],
            body_part=next((s.body_part for s in [*image_series, *series] if s.body_part), ""),
            study_description=self.store.cipher.decrypt(study.study_description_enc, column="study.description") or "",
            calling_aet=study.calling_aet)
        rule = rules_mod.route(fields, self.rules.routing)
        if study.route != rule.action:
            study.route = rule.action
            session.add(study)
        return rule

    def _roles(self, session: Session, study_id: int) -> set[str]:
        """Roles present; a series whose role was never written (crash) is classified from its row."""
        present: set[str] = set()
        for series in repo_studies.series_of(session, study_id=study_id):
            role = series.role
            if role is None:
                cipher = self.store.cipher  # description and protocol apart, as series_fields() reads them
                description = cipher.decrypt(series.description_enc, column="series.description") or ""
                protocol = cipher.decrypt(series.protocol_enc, column="series.protocol") or ""
                fields = rules_mod.SeriesFields(text=description, protocol=protocol,
                                                sequence_name=series.sequence_name,
                                                image_type=series.image_type,
                                                scanning_sequence=series.scanning_sequence,
                                                inversion_time=series.inversion_time, modality=series.modality)
                role = rules_mod.classify(fields, self.rules.roles)[0].value
                series.role = role
                session.add(series)
            present.add(role)
        return present
