"""End to end, mercure-style: DCMTK storescu and python-hl7's mllp_send in, the SR at a real Orthanc
and the ORU at a python-hl7 MLLP receiver out, through a real ``msgate serve`` process — on the
embedded defaults, and on the machine's PostgreSQL + Redis with PostgreSQL blobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlmodel import select

from msgate.config import load_settings
from msgate.demo.report import oru_values
from msgate.hl7 import mllp
from msgate.model.synth.cohort import CohortConfig, generate_subject
from msgate.storage import audit
from msgate.storage.models import Job, Study
from msgate.storage.store import open_store
from tests.integration.pacs_peers import free_port, start_mllp_receiver, start_orthanc, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.peer, pytest.mark.slow]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("patient")
    cfg = CohortConfig(root, seed=4242, mix={"ms": 1.0}, resolution=2, protocol="3d", missing_rate=0.0)
    record = generate_subject(cfg, 1)
    record["root"] = root
    return record


def _env(home: Path, setup: str, pg: str | None, orthanc_port: int, hl7_out: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    env.update({
        "MSGATE_HOME": str(home), "MSGATE_DICOM__PORT": str(free_port()), "MSGATE_HL7__PORT": str(free_port()),
        "MSGATE_METRICS__PORT": str(free_port()), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
        "MSGATE_STORAGE__PURGE_FREE_BYTES": "0", "MSGATE_DICOM__QUIET_SECONDS": "10",
        "MSGATE_PACS": json.dumps([{"name": "orthanc", "host": "127.0.0.1", "port": orthanc_port,
                                    "ae_title": "ORTHANC"}]),
        "MSGATE_HL7_OUT": json.dumps({"host": "127.0.0.1", "port": hl7_out}),
    })
    if setup == "production":
        env.update({"MSGATE_DATABASE_URL": str(pg), "MSGATE_BROKER_URL": "redis://127.0.0.1:6379/7",
                    "MSGATE_STORAGE__BLOB_BACKEND": "postgres",
                    "MSGATE_WORKERS__QUEUE_PREFIX": f"e2e{uuid.uuid4().hex[:8]}"})
    return env


@pytest.mark.parametrize("setup", ["embedded", pytest.param("production", marks=[pytest.mark.postgres,
                                                                                   pytest.mark.redis])])
def test_study_and_hl7_in_sr_and_oru_out(setup: str, patient: dict[str, object], tmp_path: Path,
                                         request: pytest.FixtureRequest) -> None:
    pg = request.getfixturevalue("pg_url") if setup == "production" else None
    home = tmp_path / "home"
    if setup == "production":
        subprocess.run([sys.executable, "-m", "msgate", "keys", "init"], check=True, capture_output=True,
                       env={**os.environ, "MSGATE_HOME": str(home)})
    orthanc = start_orthanc(tmp_path / "orthanc")
    receiver = start_mllp_receiver()
    env = _env(home, setup, pg, orthanc.dicom_port, receiver.port)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "msgate", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    root = Path(str(patient["root"]))
    try:
        from tests.integration.pacs_peers import wait_port

        wait_port(int(env["MSGATE_HL7__PORT"]), 120)
        wait_port(int(env["MSGATE_DICOM__PORT"]), 120)
        feed = tmp_path / "feed.hl7"
        feed.write_bytes(b"".join(mllp.frame((root / str(p)).read_bytes().rstrip(b"\r") + b"\r")
                                  for p in patient["hl7"]))  # type: ignore[union-attr]
        sent = subprocess.run([str(VENV_BIN / "mllp_send"), "-p", env["MSGATE_HL7__PORT"], "-f", str(feed),
                               "127.0.0.1"], capture_output=True, timeout=120, check=True)
        # The synthetic feed asks for enhanced acknowledgement (MSH-15 AL): a commit ACK (CA) per message.
        acks = sent.stdout.count(b"MSA|AA") + sent.stdout.count(b"MSA|CA")
        assert acks == len(patient["hl7"]) and b"MSA|AR" not in sent.stdout  # type: ignore[arg-type]
        folders = [str(root / str(s["dir"])) for s in patient["series"]]  # type: ignore[index, union-attr]
        subprocess.run(["storescu", "-aec", "MSGATE", "+sd", "+r", "127.0.0.1", env["MSGATE_DICOM__PORT"],
                        *folders], check=True, capture_output=True, timeout=300,
                       env={**os.environ, "TCP_NODELAY": "1"})
        study_uid, accession = str(patient["study_uid"]), str(patient["accession"])

        wait_until(lambda: proc.poll() is None and bool(_find_sr(orthanc, study_uid)) and
                   any(accession in m for m in receiver.messages), timeout=600, step=2)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        oru = [m for m in receiver.messages if accession in m][-1]  # the last one sent: the done job's
        values = oru_values(oru)
        settings = load_settings(home=home, database_url=pg, storage={"min_free_bytes": 0,
                                 "blob_backend": "postgres" if setup == "production" else "local"})
        store = open_store(settings, migrate=False, create_keys=False)
        from msgate.workers.results_io import read_result

        uid_index = store.cipher.blind_index(study_uid, scope="study")

        def delivered() -> bool:  # set just after the last peer acknowledgement
            with store.db.session() as session:
                row = session.exec(select(Study).where(Study.study_uid_index == uid_index)).one()
                return row.delivered_at is not None

        wait_until(delivered, timeout=60, step=0.5)
        with store.db.session() as session:
            study = session.exec(select(Study).where(Study.study_uid_index == uid_index)).one()
            # one run; a stall longer than the quiet period (a loaded CI box) may have started an earlier one,
            # superseded by this: the done job is the one whose result went out last
            job = session.exec(select(Job).where(Job.study_id == study.id, Job.state == "done")).one()
            assert audit.verify(session).ok
        result = read_result(store, job.id)
        assert result is not None
        assert values["lesion_count"] == len(result.lesions)
        assert values["p_ms"] == pytest.approx(result.p_ms, abs=1e-4)
        assert values["confidence"] == pytest.approx(result.confidence, abs=1e-4)
        assert values["edss_class"] == f"EDSS {result.edss_label}"
        assert values["diagnosis"] == ("Multiple sclerosis" if result.diagnosis == "MS" else
                                       "Cerebral small vessel disease")
        trace = subprocess.run([sys.executable, "-m", "msgate", "trace", accession, "--json"], env=env,
                               capture_output=True, text=True, timeout=120, check=True)
        stages = {e["stage"] for e in json.loads(trace.stdout)["events"]}
        assert {"dicom", "hl7", "ready", "job", "result"} <= stages
        store.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        orthanc.stop()
        receiver.stop()


def _find_sr(orthanc: object, study_uid: str) -> list[object]:
    import urllib.request

    body = json.dumps({"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}/tools/find", data=body,  # type: ignore[attr-defined]
                                 method="POST")
    with urllib.request.urlopen(req, timeout=10) as rsp:
        return list(json.loads(rsp.read()))
