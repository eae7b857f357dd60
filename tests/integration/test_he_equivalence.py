"""Equivalence on held-out synthetic cases: the full HE path (key service encrypt + MAC -> worker with the
public context only -> key service verify + decrypt + softmax/temperature) against the plaintext ensemble.

Model: the shipped patient checkpoint, every member of its ensemble. Inputs: the EHR of subjects of the
synthetic cohort generator (seeds never used in training), standardised with the checkpoint's scaler,
and each member's image embedding. ``msgate evaluate --he`` runs the same comparison on a cohort cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from msgate.model import he
from msgate.model.he import equivalence
from msgate.model.he_keys import HeKeys
from msgate.model.patient import checkpoint
from msgate.storage import keyring

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> HeKeys:
    home = tmp_path_factory.mktemp("he-eq")
    k = HeKeys(Path(home), keyring.init(Path(home) / "keys" / "keyring.json"))
    k.generate(he.HeParams())
    return k


@pytest.mark.parametrize(("n_cases", "max_batch"), [(208, 16), (24, 1)])
def test_he_matches_the_plaintext_ensemble(keys: HeKeys, n_cases: int, max_batch: int) -> None:
    members = len(checkpoint.load().nets)
    report = equivalence.compare(n=n_cases, batch=max_batch, inputs="generator", seed=2026 + max_batch, keys=keys)
    assert report["members"] == members >= 1 and report["cases"] == n_cases
    assert report["packs"] == -(-n_cases // max_batch)
    assert report["same_class"] == 1.0
    assert report["max_abs_dprob_edss"] <= 1e-3 and report["max_abs_dprob_ms"] <= 1e-3
    assert report["same_edss_estimate"] >= 0.99  # rounded to 0.5 steps on both sides; a tie may flip
    assert equivalence.passed(report)


def test_the_comparison_can_fail(keys: HeKeys) -> None:
    """The same numbers against a *different* plaintext model (one member left out) are far off."""
    import numpy as np

    from msgate.model.patient.calibration import softmax

    ck = checkpoint.load()
    if len(ck.nets) < 2:
        pytest.fail("the shipped checkpoint is expected to be an ensemble")
    model = he.export(ck.nets)
    u, z = equivalence.generator_inputs(ck.nets, ck.scaler, 16, 7, tuple(checkpoint.preset_from_meta(ck.meta).grid))
    got, _ = equivalence.he_logits(model, u, z, batch=16, t_edss=ck.t_edss, t_ms=ck.t_ms, keys=keys)
    he_p = np.asarray([got[f"case-{i}"]["edss_probabilities"] for i in range(16)])
    full = softmax(equivalence.torch_logits(ck.nets, u, z)[:, :4], ck.t_edss)
    first_only = softmax(equivalence.torch_logits(ck.nets[:1], u, z[:1])[:, :4], ck.t_edss)
    assert np.abs(he_p - full).max() <= 1e-3
    assert np.abs(he_p - first_only).max() > 1e-2


def test_cohort_cache_gives_the_first_n_cases(keys: HeKeys, tmp_path: Path) -> None:
    """``python -m msgate.model.he evaluate --data F --cases N`` compares N cases, not the whole file."""
    import numpy as np

    grid = checkpoint.preset_from_meta(checkpoint.load().meta).grid
    rng = np.random.default_rng(7)
    cache = tmp_path / "cohort.npz"
    np.savez(cache, image=rng.random((12, 4, *grid)).astype(np.float16), present=np.ones((12, 2), np.float32),
             lesion=rng.random((12, 8)).astype(np.float32), ehr_x=rng.normal(size=(12, 20)).astype(np.float32),
             ehr_m=np.ones((12, 20), np.float32))
    report = equivalence.compare(n=5, batch=4, data=cache, keys=keys)
    assert report["cases"] == 5 and report["packs"] == 2 and report["same_class"] == 1.0
    assert report["max_abs_dprob_edss"] <= 1e-3
