"""The demo's orchestration: start msgate and the stand-ins, send three patients, follow them to the end.

msgate runs as a real ``msgate serve`` process on the embedded defaults in a temporary home, on real
ports. HL7 goes in over MLLP (msgate's client), DICOM over C-STORE (a pynetdicom SCU, one association
per patient). The demo then watches the database until every SR has reached the PACS stand-in and
every ORU the MLLP stand-in, and reads the results back from what the stand-ins received.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE, StoragePresentationContexts
from sqlmodel import col, select

from msgate.config import load_settings
from msgate.demo.patients import DemoPatient
from msgate.demo.peers import MllpStandIn, PacsStandIn
from msgate.hl7.client import MllpClient
from msgate.results.dicom_send import c_store
from msgate.storage.models import Job, OutboxEntry, Study
from msgate.storage.store import Store, open_store

STAGES = ("hl7 acked", "dicom stored", "ready", "job", "SR acked", "ORU acked")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Progress:
    """What the live table shows for one patient."""

    patient: DemoPatient
    stages: dict[str, float] = field(default_factory=dict)
    job_state: str = ""
    job_id: str = ""
    error: str = ""

    def mark(self, stage: str, at: float) -> None:
        self.stages.setdefault(stage, at)


def environment(home: Path, pacs: PacsStandIn, mllp: MllpStandIn, dicom_port: int, hl7_port: int,
                he: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    env.update({
        "MSGATE_HOME": str(home), "MSGATE_DICOM__PORT": str(dicom_port), "MSGATE_HL7__PORT": str(hl7_port),
        "MSGATE_PACS": json.dumps([{"name": "pacs", "host": "127.0.0.1", "port": pacs.port,
                                    "ae_title": pacs.ae_title}]),
        "MSGATE_HL7_OUT": json.dumps({"host": "127.0.0.1", "port": mllp.port}),
        "MSGATE_STORAGE__MIN_FREE_BYTES": str(200 * 1024 * 1024), "MSGATE_STORAGE__PURGE_FREE_BYTES": "0",
        "MSGATE_DICOM__QUIET_SECONDS": "3", "MSGATE_METRICS__PORT": str(free_port()),
        "MSGATE_WORKERS__EHR_DEADLINE_SECONDS": "30", "MSGATE_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    })
    if he:
        env["MSGATE_HE__ENABLED"] = "true"
    return env


class System:
    """``msgate serve`` (every role) as a child process, logging to a file in the output folder."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "msgate", "serve"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ports(self, ports: list[int], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for port in ports:
            while True:
                if not self.alive():
                    raise RuntimeError(f"msgate serve exited early; see {self.log_path}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"msgate did not open port {port} in time; see {self.log_path}")
                    time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def send_hl7(patient: DemoPatient, port: int) -> None:
    with MllpClient("127.0.0.1", port, timeout=30) as client:
        for path in patient.hl7_files:
            client.send(path.read_bytes().decode("utf-8").replace("\n", "\r"))


def send_dicom(patient: DemoPatient, port: int) -> int:
    ae = AE(ae_title="DEMOSCU")
    for context in StoragePresentationContexts:
        ae.add_requested_context(context.abstract_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="MSGATE")
    if not assoc.is_established:
        raise RuntimeError("msgate refused the DICOM association")
    stored = 0
    try:
        for path in patient.dicom_files:
            status = c_store(assoc, dcmread(path))  # pynetdicom's own send_c_store can lose a response
            if status and status.Status == 0x0000:
                stored += 1
    finally:
        assoc.release()
    return stored


def poll(store: Store, rows: list[Progress], pacs: PacsStandIn, mllp: MllpStandIn, t0: float,
         t0_wall: datetime) -> bool:
    """Update each patient's stages from the database's own timestamps; True when all are done."""
    now = time.monotonic() - t0

    def since(ts: datetime | None) -> float:
        return max(0.0, (ts - t0_wall).total_seconds()) if ts is not None else now
    sr_studies = {str(ds.StudyInstanceUID) for ds in pacs.objects("SR")}
    oru_text = "\n".join(mllp.messages)
    with store.db.session() as session:
        for row in rows:
            uid_index = store.cipher.blind_index(str(row.patient.record["study_uid"]), scope="study")
            study = session.exec(select(Study).where(Study.study_uid_index == uid_index)).first()
            if study is None:
                continue
            if study.ready_at is not None:
                row.mark("ready", since(study.ready_at))
            job = session.exec(select(Job).where(Job.study_id == study.id)
                               .order_by(col(Job.created_at).desc())).first()
            if job is not None:
                row.job_id, row.job_state, row.error = job.id, job.state, job.error or ""
                if job.state == "done":
                    row.mark("job", since(job.finished_at))
                entries = session.exec(select(OutboxEntry).where(OutboxEntry.job_id == job.id)).all()
                if any(e.state == "dead" for e in entries):
                    row.error = "a result was dead-lettered"
                delivered = {e.kind: e.delivered_at for e in entries if e.delivered_at is not None}
                if str(row.patient.record["study_uid"]) in sr_studies:
                    row.mark("SR acked", since(delivered.get("dicom")))
                if str(row.patient.record["accession"]) in oru_text:
                    row.mark("ORU acked", since(delivered.get("hl7")))
    return all({"SR acked", "ORU acked"} <= set(r.stages) or r.job_state == "failed" for r in rows)


def open_demo_store(home: Path) -> Store:
    return open_store(load_settings(home=home, storage={"min_free_bytes": 0}), migrate=False, create_keys=False)


def wait_for_store(home: Path, timeout: float = 60.0) -> Store:
    deadline = time.monotonic() + timeout
    while True:
        try:
            store = open_demo_store(home)
            with store.db.session() as session:
                session.exec(select(Study).limit(1)).all()
            return store
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def summary_row(row: Progress, pacs: PacsStandIn, mllp: MllpStandIn) -> dict[str, Any]:
    """Per-patient result as received by the stand-ins (ORU values; SR presence; the HE marks of both)."""
    from msgate.demo.report import oru_values, sr_parameters
    from msgate.results.identity import HE_PARAMETER

    accession = str(row.patient.record["accession"])
    oru = next((m for m in mllp.messages if accession in m), "")
    values = oru_values(oru) if oru else {}
    srs = [ds for ds in pacs.objects("SR") if str(ds.StudyInstanceUID) == row.patient.record["study_uid"]]
    return {"kind": row.patient.kind, "subject": row.patient.record["subject"], "accession": accession,
            "study_uid": row.patient.record["study_uid"],
            "truth": {"diagnosis": row.patient.record["diagnosis"], "edss": row.patient.record["edss"],
                      "rims": row.patient.record["n_rim"], "lesions": len(row.patient.record["lesions"])},  # type: ignore[arg-type]
            "result": values, "job_id": row.job_id, "job_state": row.job_state, "error": row.error,
            "sr": {"count": len(srs), "sop_uid": str(srs[-1].SOPInstanceUID) if srs else None,
                   "destination": f"{pacs.ae_title}@127.0.0.1:{pacs.port}"},
            "oru": {"received": bool(oru), "destination": f"MLLP 127.0.0.1:{mllp.port}"},
            "he": {"sr": bool(srs) and HE_PARAMETER in sr_parameters(srs[-1]),
                   "oru": HE_PARAMETER in values.get("notes", [])},
            "stages_s": {k: round(v, 1) for k, v in row.stages.items()}}
