"""python-hl7's real ``mllp_send`` against ``msgate serve --role hl7`` (a subprocess on a free port)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from hl7_helpers import CONFORMANCE, VENV_BIN, free_port, open_home_store, start_serve, wait_mapped
from sqlmodel import select
from typer.testing import CliRunner

from msgate.cli import messages_cmd, patients_cmd
from msgate.hl7 import mllp
from msgate.hl7.msh import read_msh
from msgate.storage.models import Hl7Message, Observation, Order

pytestmark = [pytest.mark.integration, pytest.mark.peer]
MIXED = ["adt_a01_v2.5.1_fhirconverter.hl7", "adt_a04_v2.3_fhirconverter.hl7", "adt_a31_v2.5.1_8859-1_dcm4che.hl7",
         "orm_o01_v2.3_lab_fhirconverter.hl7", "omi_o23_v2.5.1_imaging_order_dcm4che.hl7",
         "oru_r01_v2.5.1_cbc_nist_lri_fhirconverter.hl7", "oru_r01_v2.3_cbc_zsegments_monai_mig.hl7",
         "adt_a40_v2.5.1_merge_dcm4che.hl7"]


def test_mllp_send_mixed_feed(tmp_path: Path) -> None:
    port = free_port()
    home = tmp_path / "home"
    # two of the samples are training (T) and debugging (D) messages: a test feed that accepts them
    proc = start_serve(home, port, MSGATE_HL7__PROCESSING_IDS='["P","T","D"]')
    try:
        raws = [(CONFORMANCE / name).read_bytes() for name in MIXED]
        feed = tmp_path / "feed.hl7"
        feed.write_bytes(b"".join(mllp.frame(r.rstrip(b"\r") + b"\r") for r in raws) * 2)  # everything twice
        out = subprocess.run([str(VENV_BIN / "mllp_send"), "-p", str(port), "-f", str(feed), "127.0.0.1"],
                             capture_output=True, timeout=120, check=True)
        acks = [line for line in out.stdout.decode("latin-1").replace("\r", "\n").split("\n") if line.startswith("MSA")]
        expected = [read_msh(r).control_id for r in raws] * 2
        codes = ["CA" if read_msh(r).enhanced else "AA" for r in raws] * 2
        assert [a.split("|")[1] for a in acks] == codes
        assert [a.split("|")[2] for a in acks] == expected
        store = open_home_store(home)
        wait_mapped(store, len(raws))

        def counted() -> bool:  # the second copies are counted by the indexer, maybe after the mapping
            with store.db.session() as session:
                return all(r.duplicates == 1 for r in session.exec(select(Hl7Message)).all())

        deadline = time.monotonic() + 30
        while not counted() and time.monotonic() < deadline:
            time.sleep(0.2)
        with store.db.session() as session:
            rows = session.exec(select(Hl7Message)).all()
            assert len(rows) == len(raws)  # stored once
            assert all(r.duplicates == 1 for r in rows), [r.duplicates for r in rows]
            assert {r.mapping_state for r in rows} == {"mapped"}
            assert {r.ack_code for r in rows} == {"AA", "CA"}
            assert len(session.exec(select(Order)).all()) >= 2
            assert session.exec(select(Observation)).first() is not None
            patient_id = rows[0].patient_id
        env = {"MSGATE_HOME": str(home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0"}
        listed = CliRunner().invoke(messages_cmd.app, ["list", "--json"], env=env)
        assert listed.exit_code == 0, listed.output
        assert '"ack": "AA"' in listed.output and '"CA"' in listed.output
        shown = CliRunner().invoke(patients_cmd.app, ["show", str(patient_id), "--json"], env=env)
        assert shown.exit_code == 0 and '"features"' in shown.output
        store.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
