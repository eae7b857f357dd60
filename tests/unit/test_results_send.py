"""The reactor checkpoint of the C-STORE sender: once parked, the reactor cannot take a message."""

from __future__ import annotations

import threading
import time

import pytest

from msgate.results.dicom_send import Outcome, _Checkpoint


def test_parked_reactor_never_runs_until_set() -> None:
    checkpoint, stop, ran = _Checkpoint(), threading.Event(), [0]

    def reactor() -> None:  # pynetdicom's loop: mark paused, wait on the checkpoint, then take messages
        while not stop.is_set():
            checkpoint.wait()
            ran[0] += 1
            time.sleep(0)

    thread = threading.Thread(target=reactor, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            checkpoint.set()  # the previous C-STORE finished
            assert checkpoint.park(2.0)  # the next one starts at once, as in a busy sender
            before = ran[0]
            time.sleep(0.0005)  # a C-STORE exchange: the reactor must not run meanwhile
            assert ran[0] == before
    finally:
        stop.set()
        checkpoint.set()
        thread.join(2)


def test_outcome_classes() -> None:
    assert Outcome("1", 0x0000, "").delivered and Outcome("1", 0xB007, "").delivered
    assert not Outcome("1", 0xA700, "").delivered and not Outcome("1", 0xA700, "").permanent
    assert Outcome("1", 0xA900, "").permanent and Outcome("1", 0x0122, "").permanent
    assert not Outcome("1", 0xC000, "").permanent and not Outcome("1", None, "").delivered
    # every warning stored the object (PS3.4 B.2.3, PS3.7 C.1): not sent again
    for warning in (0x0001, 0x0107, 0x0116, 0xB000, 0xB001, 0xB006):
        assert Outcome("1", warning, "").delivered, hex(warning)
    assert Outcome("1", 0x0111, "").delivered  # duplicate SOP instance: an earlier attempt stored it
    assert not Outcome("1", 0xC001, "").delivered and not Outcome("1", 0xA701, "").delivered


def test_a_reactor_that_did_not_park_in_time_is_let_run_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A park timeout used to leave the flag cleared: the reactor then parked for good and no longer
    saw the peer's release or abort."""
    from types import SimpleNamespace

    from pydicom.dataset import Dataset

    from msgate.config import PacsDestination
    from msgate.results import dicom_send

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3"
    sender = dicom_send.Sender(PacsDestination(name="p", host="127.0.0.1", port=104, ae_title="PACS"))
    checkpoint = _Checkpoint()
    sender.assoc = SimpleNamespace(is_established=True, _reactor_checkpoint=checkpoint,  # type: ignore[assignment]
                                   accepted_contexts=[SimpleNamespace(abstract_syntax=ds.SOPClassUID)])
    monkeypatch.setattr(dicom_send, "PARK_TIMEOUT", 0.05)
    monkeypatch.setattr(dicom_send, "dcmread", lambda _buf: ds)
    outcome = sender.send(b"")  # nothing waits in the reactor's wait(): park times out
    assert outcome.status is None and outcome.detail == "reactor did not pause"
    assert checkpoint.is_set()
