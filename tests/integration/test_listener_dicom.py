"""DCMTK and pynetdicom senders against a real ``msgate serve --role dicom`` process."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from dicom_helpers import (
    CONFORMANCE,
    as_sent,
    dataset_part,
    opened_store,
    pynd_send,
    running_listener,
    sop_uid,
    stored_bytes,
    storescu,
    write_enhanced_mr,
    write_htj2k,
    write_series,
)
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlmodel import select

from msgate.results.dicom_send import c_store
from msgate.storage.models import Association, Series, Study

pytestmark = [pytest.mark.integration, pytest.mark.peer]

# pydicom's bundled test files, each with the storescu option that proposes its transfer syntax.
PYDICOM_FILES = [
    ("MR_small.dcm", []),
    ("MR_small_implicit.dcm", ["-xi"]),
    ("MR_small_bigendian.dcm", ["-xb"]),
    ("MR_small_RLE.dcm", ["-xr"]),
    ("MR_small_jpeg_ls_lossless.dcm", ["-xt"]),
    ("MR_small_jp2klossless.dcm", ["-xv"]),
    ("image_dfl.dcm", ["-xd"]),
    ("SC_rgb_jpeg_dcmtk.dcm", ["-xy"]),
]


def _wait(predicate, timeout: float = 10.0, step: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def _study_states(home: Path) -> list[tuple[str, int, str | None]]:
    with opened_store(home) as store, store.db.session() as session:
        return [(s.state, s.runs, s.route) for s in session.exec(select(Study)).all()]


def test_echoscu(tmp_path: Path) -> None:
    with running_listener(tmp_path) as listener:
        done = subprocess.run(["echoscu", "-aec", "MSGATE", "127.0.0.1", str(listener.port)], capture_output=True,
                              timeout=30)
        assert done.returncode == 0, done.stderr


def test_store_then_echo_then_store_on_one_association(tmp_path: Path) -> None:
    """The direct data phase answers the first C-STORE; the C-ECHO goes to pynetdicom, and so does every
    message after it on that association: each still gets its right answer, and both instances are stored."""
    from pynetdicom import AE

    files = write_series(tmp_path / "mixed", count=2)
    with running_listener(tmp_path) as listener:
        ae = AE(ae_title="MIXED")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="MSGATE")
        assert assoc.is_established
        statuses = [c_store(assoc, files[0]).Status, assoc.send_c_echo().Status,
                    c_store(assoc, files[1]).Status]
        assoc.release()
        assert statuses == [0, 0, 0]
        with opened_store(listener.home) as store:
            stored = stored_bytes(store)
    for path in files:
        assert dataset_part(stored[sop_uid(path)][0]) == dataset_part(path.read_bytes())


def test_synthetic_flair_series_bit_exact_and_ready_on_release(tmp_path: Path) -> None:
    files = write_series(tmp_path / "flair", count=176, description="AX FLAIR")
    with running_listener(tmp_path, MSGATE_DICOM__QUIET_SECONDS="30") as listener:
        done = storescu(listener.port, files)
        released = time.monotonic()
        assert done.returncode == 0, done.stderr
        ready = _wait(lambda: [s for s in _study_states(listener.home) if s[0] == "ready"], timeout=15, step=0.02)
        ready_after = time.monotonic() - released
        assert ready == [("ready", 1, "pipeline")]
        # Ready on release, not after the 30 s quiet period. The ≤ 1 s target itself is measured by
        # bench/dicom_ingest.py (0.005–0.047 s); a loaded CI box must not turn that into a flaky assert.
        assert ready_after < 10, f"ready {ready_after:.2f}s after release (quiet period is 30 s)"
        with opened_store(listener.home) as store:
            stored = stored_bytes(store)

            def associations() -> list[Association]:  # the release handler records the outcome just after
                with store.db.session() as session:
                    rows = list(session.exec(select(Association)).all())
                return rows if rows and all(a.outcome != "open" for a in rows) else []

            assoc = _wait(associations, timeout=15, step=0.05)
            with store.db.session() as session:
                series = session.exec(select(Series)).one()
        assert series.role == "FLAIR" and series.instance_count == 176
        assert [a.outcome for a in assoc] == ["released"] and assoc[0].instances == 176
    for path in files:
        assert dataset_part(stored[sop_uid(path)][0]) == dataset_part(path.read_bytes())


def test_transfer_syntaxes_and_conformance_files_stored_as_received(tmp_path: Path) -> None:
    with running_listener(tmp_path) as listener:
        sent: list[Path] = []
        for name, options in PYDICOM_FILES:
            path = Path(get_testdata_file(name))
            done = storescu(listener.port, [path], *options)
            assert done.returncode == 0, (name, done.stderr)
            sent.append(path)
        conformance = sorted(CONFORMANCE.glob("*.dcm"))
        assert len(conformance) >= 3
        done = storescu(listener.port, conformance)
        assert done.returncode == 0, done.stderr
        sent += conformance
        extra = [write_enhanced_mr(tmp_path / "emr.dcm"), write_htj2k(tmp_path / "htj2k.dcm")]
        assert pynd_send(listener.port, extra) == [0, 0]
        sent += extra
        with opened_store(listener.home) as store:
            stored = stored_bytes(store)
            indexed = _index_of(store, conformance)
    for path in sent:  # bit-exact: the stored dataset is the one sent (MR_small* share a SOP Instance UID)
        assert as_sent(path.read_bytes()) in [as_sent(v) for v in stored[sop_uid(path)]], path.name
    for path in conformance:  # indexed under their own study and series, with their SOP class; never an MR role
        ds = dcmread(path, stop_before_pixels=True)
        study_uid, series_uid, sop_class, role = indexed[str(ds.SOPInstanceUID)]
        assert (study_uid, series_uid, sop_class) == (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID)
        assert role == "OTHER", (path.name, role)


def _index_of(store: object, files: list[Path]) -> dict[str, tuple[str, str, str, str | None]]:
    """SOP Instance UID -> (study UID, series UID, SOP class, series role) as the index holds them."""
    from sqlmodel import select

    from msgate.storage.models import Instance, Series, Study

    dec = store.cipher.decrypt  # type: ignore[attr-defined]
    out = {}
    with store.db.session() as session:  # type: ignore[attr-defined]
        for inst in session.exec(select(Instance)).all():
            series, study = session.get(Series, inst.series_id), session.get(Study, inst.study_id)
            out[dec(inst.sop_uid_enc, column="instance.sop_uid")] = (
                dec(study.study_uid_enc, column="study.study_uid"), dec(series.series_uid_enc, column="series.series_uid"),
                inst.sop_class_uid, series.role)
    return out


def test_concurrent_associations(tmp_path: Path) -> None:
    studies = [write_series(tmp_path / f"st{i}", count=40, description="t2_tirm_tra_dark-fluid") for i in range(4)]
    with running_listener(tmp_path) as listener:
        results: list[subprocess.CompletedProcess[str]] = []
        threads = [threading.Thread(target=lambda f=files: results.append(storescu(listener.port, f)))
                   for files in studies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr for r in results]
        with opened_store(listener.home) as store:
            stored = stored_bytes(store)
    for files in studies:
        for path in files:
            assert dataset_part(stored[sop_uid(path)][0]) == dataset_part(path.read_bytes())


def test_bad_input_gets_failure_status_and_listener_keeps_serving(tmp_path: Path) -> None:
    good = write_series(tmp_path / "good", count=3)
    data = good[0].read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[:-1000])
    no_uid_ds = dcmread(good[1])
    del no_uid_ds.SOPInstanceUID  # the file meta still names it, so the SCU can send the file
    no_uid = tmp_path / "no_uid.dcm"
    no_uid_ds.save_as(no_uid, enforce_file_format=False)
    garbage = tmp_path / "garbage.dcm"
    head = data[:len(data) - len(dataset_part(data))]  # preamble + file meta of a valid file
    garbage.write_bytes(head + bytes(range(256)) * 20)
    with running_listener(tmp_path) as listener:
        assert pynd_send(listener.port, [truncated], chunked=True) == [0xC210]
        assert pynd_send(listener.port, [no_uid], chunked=True) == [0xA900]
        assert pynd_send(listener.port, [garbage], chunked=True)[0] in (0xC210, 0xC000, 0xA900)
        _garbage_on_established_association(listener.port)
        assert listener.alive
        assert pynd_send(listener.port, [good[2]]) == [0]
        assert storescu(listener.port, good[:1]).returncode == 0
        with opened_store(listener.home) as store:
            assert sorted(map(len, stored_bytes(store).values())) == [1, 1]

            def closed() -> list[Association]:  # counts are recorded when each association ends
                with store.db.session() as session:
                    rows = list(session.exec(select(Association)).all())
                return rows if rows and all(a.outcome != "open" for a in rows) else []

            assoc = _wait(closed, timeout=15, step=0.05)
        assert sum(a.failures for a in assoc) == 3
        log_text = listener.log()  # refusals are logged by status and reason only, never values
        assert "0xC210" in log_text and "SYNTH^LISTENER" not in log_text and sop_uid(good[0]) not in log_text


def _garbage_on_established_association(port: int) -> None:
    """Associate properly, then write bytes that are no PDU at all: the listener aborts that one."""
    from pynetdicom import AE

    ae = AE(ae_title="GARBAGE")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="MSGATE")
    assert assoc.is_established
    assoc.dul.socket.socket.sendall(b"\x42" * 64 + bytes(range(256)))
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established
    assoc.abort()


def test_duplicate_is_success_and_not_stored_twice(tmp_path: Path) -> None:
    files = write_series(tmp_path / "dup", count=2)
    with running_listener(tmp_path) as listener:
        assert storescu(listener.port, files).returncode == 0
        assert storescu(listener.port, files).returncode == 0
        with opened_store(listener.home) as store:
            assert sorted(map(len, stored_bytes(store).values())) == [1, 1]


def test_unknown_ae_and_unknown_network_rejected(tmp_path: Path) -> None:
    files = write_series(tmp_path / "acl", count=1)
    with running_listener(tmp_path / "a", MSGATE_DICOM__ALLOWED_AETS='["GOODSCU"]') as listener:
        rejected = storescu(listener.port, files, aet="BADSCU")
        assert rejected.returncode != 0 and "Rejected" in rejected.stderr + rejected.stdout
        assert storescu(listener.port, files, aet="GOODSCU").returncode == 0
        assert "open to any" not in listener.log()
    with running_listener(tmp_path / "b", MSGATE_DICOM__ALLOWED_NETWORKS='["10.0.0.0/8"]') as listener:
        rejected = storescu(listener.port, files)
        assert rejected.returncode != 0 and "Rejected" in rejected.stderr + rejected.stdout
        assert pynd_send(listener.port, files) == [None]


def test_disk_floor_answers_out_of_resources(tmp_path: Path) -> None:
    files = write_series(tmp_path / "full", count=2)
    with running_listener(tmp_path, MSGATE_STORAGE__MIN_FREE_BYTES=str(1 << 60)) as listener:
        assert pynd_send(listener.port, files) == [0xA700, 0xA700]
        assert listener.alive
        with opened_store(listener.home) as store:
            assert stored_bytes(store) == {}
