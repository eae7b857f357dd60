"""``msgate evaluate --he`` as a user runs it: a held-out cohort cache through the plaintext ensemble and
the CKKS path; exit 0 with the equivalence numbers printed and written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _cache(path: Path, n: int) -> Path:
    """A cohort cache in ``build_cache``'s format (the keys ``evaluate --he`` reads): model-grid images,
    presence, lesion features and raw EHR columns with missingness."""
    from msgate.model.patient import checkpoint
    from msgate.model.patient.ehr import N_COLUMNS
    from msgate.model.patient.lesionsrc import LESION_FEATURES

    grid = tuple(checkpoint.preset_from_meta(checkpoint.load().meta).grid)
    rng = np.random.default_rng(5)
    m = (rng.random((n, N_COLUMNS)) > 0.2).astype(np.float32)
    np.savez(path, image=np.abs(rng.normal(size=(n, 4, *grid))).astype(np.float16),
             present=np.ones((n, 2), np.float32), lesion=np.abs(rng.normal(size=(n, len(LESION_FEATURES)))),
             ehr_x=(rng.normal(size=(n, N_COLUMNS)) * m).astype(np.float32), ehr_m=m)
    return path


def test_evaluate_he_on_a_cohort_cache(tmp_path: Path) -> None:
    data = _cache(tmp_path / "cohort.npz", 24)
    run = subprocess.run([sys.executable, "-m", "msgate", "evaluate", "--he", "--data", str(data), "--batch", "8",
                          "--report", str(tmp_path / "report")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "he-equivalence.json").read_text())
    assert report["passed"] is True and report["cases"] == 24 and report["packs"] == 3
    assert report["members"] >= 2 and "cohort cache" in report["source"]
    assert report["same_class"] == 1.0 and report["max_abs_dprob_edss"] <= 1e-3
    assert "same class 100.0 %" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "msgate", "evaluate", "--he", "patient"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0  # --he is a run of its own, not an option of a subcommand
