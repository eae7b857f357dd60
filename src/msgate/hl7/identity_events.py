"""ADT events that change who a patient is (HL7 v2.5.1 §3.3, §3.6): merges, identifier changes, and those
msgate stores but does not apply.

- Merges, A40 and the older A18, A30, A34, A36, A39: the PID patient survives; each patient that MRG-1
  (else MRG-4, the prior patient ID of the older events) names is retired into it: its identifiers,
  orders, observations and studies move (:func:`repo_ehr.merge`).
- A47 change patient identifier list, and the older A46: MRG-1 is the identifier the patient had, PID-3
  its new list. The patient keeps its data, and its MRG-1 identifiers are replaced by PID-3's
  (:func:`repo_ehr.replace_identifiers`); DICOM studies filed under the new MRN link to it. When a new
  identifier already names another patient the two are one person: a merge into that patient, as A40.
  When no stored patient holds the MRG-1 identifier, the PID patient is filed as for A08, with the W
  finding ``prior_identifier_unknown``.
- Other identity events (:data:`NOT_APPLIED`: link and unlink, moves, account, visit and alternate-ID
  changes): msgate keeps no links, accounts or visits, so they are stored and ``skipped`` with the W
  finding ``identity_event_not_applied``, which a plain ``skipped`` (an A03) does not have.

Only patient identifiers (any type but ``patient_ids.NON_PATIENT_ID_TYPES``) find the patients either side. Identifiers that
name two patients end the message in ``error`` / ``identifier_conflict`` with nothing written. Each merge
and identifier change is audited (``patient.merged``, ``patient.identifiers_changed``; internal ids only).
"""

from __future__ import annotations

from collections.abc import Iterator

from msgate.hl7.mapping import MappingError, Outcome, Tx, _patient_from_pid, identifiers, pid_identifiers
from msgate.hl7.parse import Message, Segment
from msgate.storage import audit, repo_ehr
from msgate.storage.models import Patient
from msgate.storage.repo_ehr import Identifier

MERGE_TRIGGERS = frozenset({"A18", "A30", "A34", "A36", "A39", "A40"})
CHANGE_TRIGGERS = frozenset({"A46", "A47"})
NOT_APPLIED = frozenset({"A24", "A35", "A37", "A41", "A42", "A43", "A44", "A45", "A48", "A49", "A50", "A51"})
ACTOR = "hl7-mapping"


def apply(tx: Tx, msg: Message, trigger: str, outcome: Outcome, message_id: int) -> bool:
    """Map ``msg`` if ``trigger`` is an identity event (True), else leave it to the caller (False)."""
    if trigger in MERGE_TRIGGERS:
        for pid, mrg in _pairs(msg):
            _merge(tx, pid, _prior(mrg), outcome, trigger, message_id)
    elif trigger in CHANGE_TRIGGERS:
        for pid, mrg in _pairs(msg):
            _change(tx, pid, _prior(mrg), outcome, trigger, message_id)
    elif trigger in NOT_APPLIED:
        outcome.state = "skipped"
        outcome.findings.append({"code": "identity_event_not_applied", "location": "MSH^1^9^1^2", "severity": "W"})
    else:
        return False
    return True


def _pairs(msg: Message) -> Iterator[tuple[Segment, Segment]]:
    """Each PID with the MRG that follows it (before the next PID)."""
    segs = msg.segments
    count = 0
    for i, seg in enumerate(segs):
        if seg.name != "PID":
            continue
        mrg = next((s for s in segs[i + 1:] if s.name in ("MRG", "PID")), None)
        if mrg is None or mrg.name != "MRG":
            raise MappingError("merge_without_mrg")
        count += 1
        yield seg, mrg
    if not count:
        raise MappingError("no_patient_segment")


def _prior(mrg: Segment) -> list[Identifier]:
    """MRG-1 (prior patient identifier list), else MRG-4 (prior patient ID, the older events)."""
    return identifiers(mrg, 1) or identifiers(mrg, 4)


def _merge(tx: Tx, pid: Segment, retired_ids: list[Identifier], outcome: Outcome, trigger: str,
           message_id: int) -> Patient:
    """The PID patient survives; each patient ``retired_ids`` name (MRG-1 may name several) merges into it."""
    session, cipher = tx.session, tx.store.cipher
    surviving = _patient_from_pid(tx, pid, outcome)
    tx.flush()  # a merge moves stored observations and studies: write the pending ones first
    for retired in repo_ehr.find_patients(session, cipher, retired_ids):
        if retired.id == surviving.id:
            continue
        repo_ehr.merge(session, survivor_patient=surviving, retired=retired)
        audit.append(session, kind="patient.merged", actor=ACTOR, subject=f"patient:{retired.id}",
                     detail={"survivor": surviving.id, "trigger": trigger, "message": message_id})
    repo_ehr.add_identifiers(session, cipher, surviving, retired_ids)
    tx.merged()
    return surviving


def _change(tx: Tx, pid: Segment, old: list[Identifier], outcome: Outcome, trigger: str,
            message_id: int) -> None:
    """A47: the patient holding ``old`` now goes by PID-3 (or merges into the patient PID-3 names)."""
    session, cipher = tx.session, tx.store.cipher
    owners = repo_ehr.find_patients(session, cipher, old)
    targets = repo_ehr.find_patients(session, cipher, pid_identifiers(pid))
    if len(owners) > 1 or len(targets) > 1:
        raise repo_ehr.IdentifierConflict()
    if not owners:  # the PID-3 patient as it is (a change sent again), or, not known either, a new one
        if not targets:
            outcome.findings.append({"code": "prior_identifier_unknown", "location": "MRG^1^1", "severity": "W"})
        _patient_from_pid(tx, pid, outcome)
        return
    owner = owners[0]
    if targets and targets[0].id != owner.id:
        _merge(tx, pid, old, outcome, trigger, message_id)
        return
    tx.flush()  # pending rows of the old identifier's patient are written before its identifiers change
    removed = repo_ehr.replace_identifiers(session, cipher, owner, old=old, new=pid_identifiers(pid))
    tx.merged()
    _patient_from_pid(tx, pid, outcome)  # the demographics PID carries, on the patient that now holds PID-3
    audit.append(session, kind="patient.identifiers_changed", actor=ACTOR, subject=f"patient:{owner.id}",
                 detail={"trigger": trigger, "message": message_id, "removed": removed})
