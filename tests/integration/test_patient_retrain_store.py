"""Retraining on a hospital's own data (issue 7): synthetic patients enter through the real DICOM
listener (pynetdicom C-STORE to ``msgate serve --role dicom``) and the real HL7 feed (MLLP to
``msgate serve --role hl7``); ``msgate train patient --from-store`` then builds its training set from the
store (cases as the workers load them, EDSS labels from the HL7 ``MS-EDSS`` observations) and trains.

The data path is checked against the in-memory synthetic path of the same subjects: same labels, same
EHR values, same model-grid images and lesion features. A tiny run (one epoch) is enough: the point
is the path, not the accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pynetdicom import AE, StoragePresentationContexts
from sqlmodel import col, select

from msgate.hl7.client import MllpClient
from msgate.model.patient.lesionsrc import load_lesion_source
from msgate.model.patient.presets import get_preset
from msgate.model.patient.synthdata import case_arrays, synth_case
from msgate.model.synth.cohort import CohortConfig, generate_subject
from msgate.results.dicom_send import c_store
from msgate.storage.models import AuditEvent, Observation, Study
from msgate.storage.repo_studies import FINAL_STATES
from msgate.workers.training import collect
from tests.integration.dicom_helpers import ListenerProc, free_port, listener_env, opened_store
from tests.integration.hl7_helpers import start_serve

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]
SEED, N = 7307, 4


def _c_store(port: int, files: list[Path]) -> None:
    """One pynetdicom association per patient; generous timeouts (the test machine may be busy)."""
    ae = AE(ae_title="RETRAINSCU")
    for context in StoragePresentationContexts:
        ae.add_requested_context(context.abstract_syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
    assoc = ae.associate("127.0.0.1", port, ae_title="MSGATE")
    assert assoc.is_established
    try:
        statuses = [c_store(assoc, dcmread(path)) for path in files]
    finally:
        assoc.release()
    assert all(s and s.Status == 0x0000 for s in statuses)


def _send(records: list[dict[str, object]], root: Path, dicom_port: int, hl7_port: int) -> int:
    with MllpClient("127.0.0.1", hl7_port, timeout=120) as client:
        for rec in records:
            for rel in rec["hl7"]:  # type: ignore[attr-defined]
                client.send((root / str(rel)).read_bytes().decode("utf-8").replace("\n", "\r"))
    sent = 0
    for rec in records:
        files = [p for s in rec["series"] for p in sorted((root / str(s["dir"])).glob("*.dcm"))]  # type: ignore[attr-defined, index]
        _c_store(dicom_port, files)
        sent += len(files)
    return sent


def _wait_stored(home: Path, n: int, instances: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with opened_store(home) as store, store.db.session() as session:
            ready = session.exec(select(Study).where(col(Study.state).in_(sorted(FINAL_STATES)))).all()
            labels = session.exec(select(Observation).where(Observation.code == "MS-EDSS")).all()
            if (len(ready) == n and sum(s.instance_count for s in ready) == instances
                    and len({o.patient_id for o in labels}) == n):
                return
        time.sleep(1.0)
    raise AssertionError("the studies and EDSS observations did not all arrive")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]]]:
    """A msgate home holding N synthetic patients that came in over DICOM and HL7."""
    tmp = tmp_path_factory.mktemp("retrain")
    root, home = tmp / "cohort", tmp / "home"
    cfg = CohortConfig(root, seed=SEED, resolution=2, missing_rate=0.1)
    records = [generate_subject(cfg, i) for i in range(1, N + 1)]
    port = free_port()
    listener = ListenerProc(home, port, listener_env(home, port, MSGATE_DICOM__QUIET_SECONDS="3")).start(60)
    hl7_port = free_port()
    hl7 = start_serve(home, hl7_port)
    try:
        _wait_stored(home, N, _send(records, root, port, hl7_port))
    finally:
        hl7.terminate()
        hl7.wait(30)
        listener.stop()
    return home, records


def test_store_training_set_matches_the_synthetic_path(fed: tuple[Path, list[dict[str, object]]]) -> None:
    home, records = fed
    preset, source = get_preset("tiny"), load_lesion_source("lesion-model")
    with opened_store(home) as store:
        arrays, skipped = collect(store, preset, source)
    assert not skipped and len(arrays["edss"]) == N
    assert np.array_equal(arrays["edss"], [float(r["edss"]) for r in records])  # type: ignore[arg-type]
    assert np.isnan(arrays["ms"]).all() and np.isnan(arrays["n_rim"]).all()  # not in the store: unlabelled
    assert len(set(arrays["group"].tolist())) == N  # one patient per study, grouped by internal id
    for i in range(N):
        case, truth = synth_case(SEED, i + 1)
        assert truth.edss == arrays["edss"][i]
        ref = case_arrays(case, preset, source)
        assert np.array_equal(ref["ehr_m"], arrays["ehr_m"][i])
        assert np.allclose(ref["ehr_x"], arrays["ehr_x"][i], atol=0.05)  # age from PID-7 birth date, not rounded
        assert np.allclose(ref["present"], arrays["present"][i])
        assert np.allclose(ref["lesion"], arrays["lesion"][i], atol=1e-4)
        assert np.abs(ref["image"].astype(np.float32) - arrays["image"][i].astype(np.float32)).max() < 2e-2


def test_train_patient_from_store_cli(fed: tuple[Path, list[dict[str, object]]], tmp_path: Path) -> None:
    home, records = fed
    out = tmp_path / "retrained.pt"
    env = {**listener_env(home, free_port()), "MSGATE_LOG_LEVEL": "INFO"}
    proc = subprocess.run([sys.executable, "-m", "msgate", "train", "patient", "--from-store", "--epochs", "1",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["n_train"] + meta["n_val"] == N and meta["epochs_run"] == [1] and meta["n_patients"] == N
    assert meta["training_data"].startswith("msgate store: 4 studies of 4 patients")
    assert meta["base_model"]["model_name"] == "msgate-patient"
    from msgate.model.patient import checkpoint

    assert len(checkpoint.load(out).nets) == 1
    text = proc.stdout + proc.stderr
    for rec in records:  # no identifier of the synthetic patients in the output
        assert str(rec["subject"]) not in text and str(rec["accession"]) not in text
    with opened_store(home) as store, store.db.session() as session:
        kinds = [e.kind for e in session.exec(select(AuditEvent).where(AuditEvent.actor == "train.patient")).all()]
    assert kinds.count("decrypt.training") >= 2 * N  # label + at least FLAIR and EHR per study
    assert "decrypt.inference" not in kinds
