"""SIGKILL the listener in the middle of a multi-association transfer: nothing acknowledged is lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from dicom_helpers import (
    ListenerProc,
    as_sent,
    free_port,
    listener_env,
    opened_store,
    sop_uid,
    stored_bytes,
    storescu,
    write_series,
)
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.presentation import build_context

from msgate.results.dicom_send import c_store
from msgate.storage import audit

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _sender(port: int, files: list[Path], log: dict[Path, int | None]) -> None:
    """One association; records the status the listener answered for each instance (None: none)."""
    ae = AE(ae_title="CRASHSCU")
    ae.requested_contexts = [build_context("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")]
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="MSGATE")
    if not assoc.is_established:
        return
    try:
        for path in files:
            if not assoc.is_established:
                break
            try:
                status = c_store(assoc, dcmread(path))
            except RuntimeError:  # the association died between the check and the send
                break
            log[path] = int(status.Status) if status and "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.parametrize("round_", range(3))
def test_sigkill_mid_transfer_loses_no_acknowledged_instance(tmp_path: Path, round_: int) -> None:
    lanes = [write_series(tmp_path / f"lane{i}", count=60, description="AX FLAIR", number=i + 1) for i in range(4)]
    port = free_port()
    home = tmp_path / "home"
    listener = ListenerProc(home, port, listener_env(home, port)).start()
    log: dict[Path, int | None] = {}
    threads = [threading.Thread(target=_sender, args=(port, files, log), daemon=True) for files in lanes]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while sum(1 for s in log.values() if s == 0) < 20 + 15 * round_ and time.monotonic() < deadline:
        time.sleep(0.005)
    listener.kill()
    for thread in threads:
        thread.join(timeout=30)
    acknowledged = [path for path, status in log.items() if status == 0]
    total = sum(len(files) for files in lanes)
    assert 0 < len(acknowledged) < total, "the kill must land mid-transfer"

    listener.start()  # restart on the same home: migrations, key ring and index must come back
    try:
        with opened_store(home) as store:
            stored = stored_bytes(store)
            with store.db.session() as session:
                assert audit.verify(session).ok
        for path in acknowledged:
            versions = stored.get(sop_uid(path))
            assert versions, f"acknowledged instance missing after SIGKILL: {path.name}"
            assert as_sent(path.read_bytes()) in [as_sent(v) for v in versions]
        assert storescu(port, lanes[0][:2]).returncode == 0  # and it serves again
    finally:
        listener.stop()
