"""The reactor checkpoint of the C-STORE sender: once parked, the reactor cannot take a message."""

from __future__ import annotations

import threading
import time

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
