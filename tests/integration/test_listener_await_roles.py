"""Routing rules' ``await_roles`` on a real listener: a router that sends each series on its own association.

Without them the study was ready at the FLAIR association's release and ran; the QSM's association then
reopened it and ran it again as a correction. With ``await_roles = ["QSM"]`` the FLAIR's release is held:
one run with both series at the QSM's release, or a run without QSM after the quiet period.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dicom_helpers import running_listener, storescu, write_series
from pydicom import dcmread
from test_listener_readiness import _audit, _studies, _wait_state

from msgate.storage.models import Study

pytestmark = [pytest.mark.integration, pytest.mark.peer]

AWAIT_QSM = json.dumps([
    {"name": "MS brain, QSM awaited", "action": "pipeline", "modality": ["MR"], "required_roles": ["FLAIR"],
     "await_roles": ["QSM"]},
    {"name": "else stored", "action": "store_only", "required_roles": []},
])


def _flair_and_qsm(tmp: Path, *, qsm_count: int = 3) -> tuple[list[Path], list[Path]]:
    flair = write_series(tmp / "flair", count=6, description="t2_tirm_tra_dark-fluid")
    study_uid = str(dcmread(flair[0], stop_before_pixels=True).StudyInstanceUID)
    qsm = write_series(tmp / "qsm", count=qsm_count, description="QSM", study_uid=study_uid, number=2,
                       scanning=("GR",), inversion_time=0.0)
    return flair, qsm


def _aware(ts: datetime | None) -> datetime:
    assert ts is not None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _wait_runs(home: Path, runs: int, timeout: float) -> list[Study]:
    deadline = time.monotonic() + timeout
    while True:
        studies = _studies(home)
        if [(s.state, s.runs) for s in studies] == [("ready", runs)] or time.monotonic() > deadline:
            return studies
        time.sleep(0.05)


def test_qsm_on_a_second_association_gives_one_run_with_both_roles(tmp_path: Path) -> None:
    flair, qsm = _flair_and_qsm(tmp_path)
    with running_listener(tmp_path, MSGATE_DICOM__QUIET_SECONDS="20", MSGATE_RULES__ROUTING=AWAIT_QSM) as listener:
        assert storescu(listener.port, flair).returncode == 0
        time.sleep(1.5)  # the FLAIR's release is held: no run without the QSM
        assert [(s.state, s.runs) for s in _studies(listener.home)] == [("receiving", 0)], listener.log()[-4000:]
        sent = datetime.now(UTC)
        assert storescu(listener.port, qsm).returncode == 0
        released = datetime.now(UTC)
        studies = _wait_runs(listener.home, 1, timeout=10)  # on release: the quiet period is 20 s
        assert [(s.state, s.runs) for s in studies] == [("ready", 1)], listener.log()[-4000:]
        ready_at = _aware(studies[0].ready_at)
        assert sent <= ready_at <= released + timedelta(seconds=1), (sent, ready_at, released)
        time.sleep(1.0)
        assert [(s.state, s.runs) for s in _studies(listener.home)] == [("ready", 1)]  # one run, not two
        ready = _audit(listener.home, "study.ready")
        assert [(e.detail["run"], e.detail["reason"], e.detail["roles"]) for e in ready] == [
            (1, "released", ["FLAIR", "QSM"])]
        assert [e.kind for e in _audit(listener.home, "study.")] == ["study.ready", "study.awaited"]
        awaited = _audit(listener.home, "study.awaited")[0].detail
        assert awaited == {"run": 1, "reason": "released", "held": True, "absent": [], "await_roles": ["QSM"]}
        log = listener.log()
        assert "study held for awaited roles" in log and "awaited roles arrived" in log
        assert "MRN-SYN-1" not in log and "SYNTH" not in log and "ACC-SYN-1" not in log


def test_flair_alone_with_awaited_qsm_is_ready_after_the_quiet_period(tmp_path: Path) -> None:
    flair, _ = _flair_and_qsm(tmp_path)
    with running_listener(tmp_path, MSGATE_DICOM__QUIET_SECONDS="2", MSGATE_RULES__ROUTING=AWAIT_QSM) as listener:
        assert storescu(listener.port, flair).returncode == 0
        released = datetime.now(UTC)
        time.sleep(0.8)
        assert [s.state for s in _studies(listener.home)] == ["receiving"]  # held at the release
        studies, _ = _wait_state(listener.home, "ready", timeout=15)
        assert [(s.state, s.runs) for s in studies] == [("ready", 1)], listener.log()[-4000:]
        assert _aware(studies[0].ready_at) >= released + timedelta(seconds=1.5)  # 2 s after the last instance
        ready = _audit(listener.home, "study.ready")
        assert [(e.detail["reason"], e.detail["roles"], e.detail["missing"]) for e in ready] == [
            ("quiet", ["FLAIR"], [])]
        awaited = _audit(listener.home, "study.awaited")[0].detail
        assert awaited == {"run": 1, "reason": "quiet", "held": True, "absent": ["QSM"], "await_roles": ["QSM"]}
        assert "awaited roles absent at the quiet period" in listener.log()


def test_flair_and_qsm_on_one_association_are_ready_at_the_release(tmp_path: Path) -> None:
    """Nothing is held when the awaited roles come with the FLAIR: ready at once, no study.awaited event."""
    flair, qsm = _flair_and_qsm(tmp_path)
    with running_listener(tmp_path, MSGATE_DICOM__QUIET_SECONDS="20", MSGATE_RULES__ROUTING=AWAIT_QSM) as listener:
        assert storescu(listener.port, [*flair, *qsm]).returncode == 0
        released = datetime.now(UTC)
        studies = _wait_runs(listener.home, 1, timeout=10)
        assert [(s.state, s.runs) for s in studies] == [("ready", 1)], listener.log()[-4000:]
        assert _aware(studies[0].ready_at) <= released + timedelta(seconds=1)
        assert [e.kind for e in _audit(listener.home, "study.")] == ["study.ready"]
        assert _audit(listener.home, "study.ready")[0].detail["roles"] == ["FLAIR", "QSM"]


def test_without_await_roles_the_flair_release_is_ready_as_before(tmp_path: Path) -> None:
    """The default rules await nothing: ready at the FLAIR's release, and the QSM's association runs again."""
    flair, qsm = _flair_and_qsm(tmp_path)
    with running_listener(tmp_path, MSGATE_DICOM__QUIET_SECONDS="20") as listener:
        assert storescu(listener.port, flair).returncode == 0
        released = datetime.now(UTC)
        studies = _wait_runs(listener.home, 1, timeout=10)
        assert [(s.state, s.runs) for s in studies] == [("ready", 1)], listener.log()[-4000:]
        assert _aware(studies[0].ready_at) <= released + timedelta(seconds=1)
        assert storescu(listener.port, qsm).returncode == 0
        studies = _wait_runs(listener.home, 2, timeout=10)
        assert [(s.state, s.runs) for s in studies] == [("ready", 2)], listener.log()[-4000:]
        assert [e.kind for e in _audit(listener.home, "study.")] == ["study.ready", "study.reopened", "study.ready"]
        assert _audit(listener.home, "study.awaited") == []


def test_an_aborted_qsm_association_waits_the_longer_period_then_the_retry_is_ready(tmp_path: Path) -> None:
    """FLAIR released (held for the QSM), then the QSM's association aborts half way: the study waits
    ABORTED_QUIET_FACTOR quiet periods, not one, and the sender's retry is ready at its release, once."""
    from pynetdicom import AE
    from pynetdicom.presentation import build_context

    from msgate.results.dicom_send import c_store

    flair, qsm = _flair_and_qsm(tmp_path, qsm_count=4)
    first = dcmread(qsm[0], stop_before_pixels=True)
    scu = AE(ae_title="ROUTER")
    scu.requested_contexts = [build_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)]
    quiet = 1.5
    with running_listener(tmp_path, MSGATE_DICOM__QUIET_SECONDS=str(quiet),
                          MSGATE_RULES__ROUTING=AWAIT_QSM) as listener:
        assert storescu(listener.port, flair).returncode == 0
        assoc = scu.associate("127.0.0.1", listener.port, ae_title="MSGATE")
        assert assoc.is_established
        assert [int(c_store(assoc, f).Status) for f in qsm[:2]] == [0, 0]
        assoc.abort()  # half the QSM sent
        time.sleep(quiet * 3)  # three quiet periods: the held study would be ready after one without the abort
        assert [(s.state, s.runs) for s in _studies(listener.home)] == [("receiving", 0)], listener.log()[-4000:]
        assert storescu(listener.port, qsm).returncode == 0  # the retry, released
        released = datetime.now(UTC)
        studies = _wait_runs(listener.home, 1, timeout=10)
        assert [(s.state, s.runs) for s in studies] == [("ready", 1)], listener.log()[-4000:]
        assert _aware(studies[0].ready_at) <= released + timedelta(seconds=1)
        ready = _audit(listener.home, "study.ready")
        assert [(e.detail["run"], e.detail["reason"], e.detail["roles"]) for e in ready] == [
            (1, "released", ["FLAIR", "QSM"])]
        assert _audit(listener.home, "study.awaited")[0].detail["held"] is True
