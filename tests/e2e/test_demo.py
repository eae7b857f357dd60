"""`msgate demo`, the README's main command, as CI runs it: it must exit 0 with every SR and ORU
acknowledged, and the numbers it reports (read back from what the stand-ins received) must match the
results msgate stored. `msgate demo --he` (one patient, to keep the suite short) must do the same with
the EHR branch under CKKS, and the SR and ORU must say so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from msgate.config import load_settings
from msgate.storage import audit
from msgate.storage.models import AuditEvent, Job, Study
from msgate.storage.store import Store, open_store
from msgate.workers.results_io import read_result

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]], Store]:
    out, home = tmp_path / "out", tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    run = subprocess.run([sys.executable, "-m", "msgate", "demo", "--out", str(out), "--home", str(home),
                          "--timeout", "600", *args], env={**env, "COLUMNS": "100"}, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert (out / "summary.html").is_file() and list(out.glob("key_*.png"))
    store = open_store(load_settings(home=home, storage={"min_free_bytes": 0}), migrate=False, create_keys=False)
    return run, json.loads((out / "results.json").read_text()), store


def _shown_is_stored(run: subprocess.CompletedProcess[str], results: list[dict[str, Any]], store: Store) -> dict[str, str]:
    """Every SR and ORU acked, the audit chain intact, and the printed numbers those msgate stored."""
    jobs: dict[str, str] = {}
    with store.db.session() as session:
        assert audit.verify(session).ok
        for r in results:
            assert r["sr"]["count"] >= 1 and r["oru"]["received"]
            study = session.exec(select(Study).where(Study.study_uid_index == store.cipher.blind_index(
                str(r["study_uid"]), scope="study"))).one()
            job = session.exec(select(Job).where(Job.study_id == study.id, Job.state == "done")).one()
            assert job.id == r["job_id"]
            jobs[r["subject"]] = job.id
    for r in results:  # each read opens its own transaction
        stored = read_result(store, jobs[r["subject"]])
        assert stored is not None
        shown = r["result"]
        assert shown["lesion_count"] == len(stored.lesions)
        assert shown["p_ms"] == pytest.approx(stored.p_ms, abs=1e-4)
        assert shown["confidence"] == pytest.approx(stored.confidence, abs=1e-4)
        assert shown["edss_class"] == f"EDSS {stored.edss_label}"
        assert shown.get("rim_count") == stored.rim_count
        assert f"EDSS class EDSS {stored.edss_label} (confidence {stored.confidence:.2f}" in run.stdout
    return jobs


def test_demo_end_to_end(tmp_path: Path) -> None:
    run, results, store = _demo(tmp_path)
    try:
        assert [r["kind"] for r in results] == ["MS with rims", "MS without rims", "cSVD"]
        _shown_is_stored(run, results, store)
        assert not any(r["he"]["sr"] or r["he"]["oru"] for r in results)  # no HE claim without HE
        assert "homomorphic" not in run.stdout
    finally:
        store.close()


def test_demo_with_he(tmp_path: Path) -> None:
    run, results, store = _demo(tmp_path, "--he", "--patients", "1")
    try:
        assert [r["kind"] for r in results] == ["MS with rims"]
        jobs = _shown_is_stored(run, results, store)
        assert all(r["he"] == {"sr": True, "oru": True} for r in results)
        assert "under homomorphic encryption (CKKS): said by the SR and ORU" in run.stdout
        for job_id in jobs.values():
            stored = read_result(store, job_id)
            assert stored is not None and "he" in stored.flags and stored.model_version.endswith("+he")
            with store.db.session() as session:
                events = session.exec(select(AuditEvent).where(AuditEvent.subject == f"job:{job_id}")).all()
            assert [e.actor.split("@")[0] for e in events if e.kind == "decrypt.he_encrypt"] == ["keys"]
            assert not [e for e in events if e.kind == "decrypt.inference" and "ehr" in e.detail]
    finally:
        store.close()
