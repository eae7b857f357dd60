"""No plaintext PHI at rest or in logs: ingest known identifiers, then grep every byte under home."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from msgate.log import SafeFormatter
from msgate.storage.ingest import Hl7Header
from msgate.storage.store import Store, open_store
from tests.conftest import make_settings
from tests.dicom_factory import KNOWN_ACCESSION, KNOWN_MRN, KNOWN_NAME, mr_slice

NEEDLES = [KNOWN_NAME.encode(), b"PHITEST", b"ZELDA", KNOWN_MRN.encode(), KNOWN_ACCESSION.encode()]
ADT = (f"MSH|^~\\&|ADT|HOSP|MSGATE|HOSP|20261101120000||ADT^A04^ADT_A01|CTRL1|P|2.5.1\r"
       f"PID|1||{KNOWN_MRN}^^^HOSP^MR||PHITEST^ZELDA||19700101|F\r"
       f"OBR|1|PL1|FI1|MRHEAD^MRI HEAD|||20261101||||||||||{KNOWN_ACCESSION}\r").encode()


def _ingest_known_phi(home: Path) -> Store:
    store = open_store(make_settings(home, "sqlite"))
    study = "1.2.826.0.1.3680043.8.498.900"
    for i in range(3):
        store.ingest.store_instance(source=mr_slice(study_uid=study, series_uid=study + ".1", index=i),
                                   calling_aet="PACS")
    store.ingest.store_hl7(raw=ADT, header=Hl7Header(control_id="CTRL1", sending_application="ADT",
                                                     sending_facility="HOSP", message_type="ADT", trigger="A04"))
    return store


def _grep(home: Path) -> list[Path]:
    files = [p for p in home.rglob("*") if p.is_file()]
    for path in files:
        content = path.read_bytes()
        for needle in NEEDLES:
            assert needle not in content, f"{needle!r} found in {path.relative_to(home)}"
    return files


def test_no_plaintext_phi_under_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = _ingest_known_phi(home)
    files = _grep(home)  # while running: the WAL still holds the recent pages
    assert any(p.name.endswith("-wal") for p in files), "the WAL must be part of what is checked"
    assert any("blobs" in p.parts for p in files)
    store.close()
    _grep(home)  # after the checkpoint on close


def test_no_phi_in_any_log_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter("json"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with caplog.at_level(logging.DEBUG):
            _ingest_known_phi(tmp_path / "home").close()
            store = open_store(make_settings(tmp_path / "home", "sqlite"))
            with pytest.raises(Exception):
                store.ingest.store_instance(source=mr_slice()[:300])
    finally:
        root.removeHandler(handler)
    rendered = stream.getvalue() + "\n".join(
        f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert any(r.getMessage() == "instance stored" for r in caplog.records), "ingest logs at DEBUG"
    for needle in NEEDLES:
        assert needle.decode() not in rendered
