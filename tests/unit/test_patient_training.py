"""Patient-model training pieces: ordinal fusion folding, patient-level splits, masked losses for
unlabelled store rows, Rim+ refresh of a cache, the ECE floor, and the EDSS label lookup in the store."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from msgate.model.patient import train as T
from msgate.model.patient.calibration import ece
from msgate.model.patient.fusion import GatedLinearFusion, OrdinalGatedFusion
from msgate.model.patient.metrics import ece_floor

torch.set_num_threads(1)


@pytest.mark.parametrize("quadratic", [False, True])
def test_ordinal_fusion_folds_exactly_into_the_plain_form(quadratic: bool) -> None:
    torch.manual_seed(0)
    f = OrdinalGatedFusion(8, 5, quadratic=quadratic)
    torch.nn.init.normal_(f.cut)
    z, e1, e2 = torch.randn(6, 8), torch.randn(6, 5), torch.randn(6, 5)
    plain = f.materialize()
    assert type(plain) is GatedLinearFusion
    with torch.no_grad():
        assert torch.allclose(f(z, e1), plain(z, e1), atol=1e-5)
        assert torch.allclose(f.ehr_term(z, e1), plain.ehr_term(z, e1), atol=1e-5)
        base = plain(z, torch.zeros_like(e1))  # still linear in the EHR embedding given the image
        assert torch.allclose(plain(z, e1 + 2 * e2) - base, (plain(z, e1) - base) + 2 * (plain(z, e2) - base),
                              atol=1e-4)
        logits = f(z, e1)[:, :4]
    diffs = (logits[:, 1:] - logits[:, :-1]) - f.cut.detach().diff()  # adjacent-category log-odds
    if not quadratic:  # ... are one shared score s per patient
        assert torch.allclose(diffs, diffs[:, :1].expand_as(diffs), atol=1e-5)


def test_group_split_keeps_patients_whole_and_matches_row_split() -> None:
    groups = np.repeat(np.arange(30), 3)
    tr, va = T.split(len(groups), 0.2, 0, groups)
    assert not set(groups[tr]) & set(groups[va]) and len(tr) + len(va) == 90
    assert len(set(groups[va])) == 6
    rows = np.arange(50)
    assert all(np.array_equal(a, b) for a, b in zip(T.split(50, 0.2, 3, rows), T.split(50, 0.2, 3)))


def test_loss_masks_missing_ms_and_rim_labels() -> None:
    out = {"edss_logits": torch.zeros(2, 4, requires_grad=True), "edss": torch.zeros(2, requires_grad=True),
           "ms_logit": torch.zeros(2, requires_grad=True), "rim_log_rate": torch.zeros(2, requires_grad=True)}
    b = {"edss_class": torch.tensor([0, 2]), "edss": torch.tensor([1.0, 5.0]), "ms": torch.tensor([np.nan, np.nan]),
         "n_rim": torch.tensor([np.nan, 2.0]), "present": torch.tensor([[1.0, 1.0], [0.0, 1.0]])}
    loss = T.loss_fn(out, b, torch.ones(4))
    loss.backward()
    assert torch.isfinite(loss)
    assert out["ms_logit"].grad is not None and float(out["ms_logit"].grad.abs().sum()) == 0.0
    assert float(out["rim_log_rate"].grad.abs().sum()) == 0.0  # row 0 unlabelled, row 1 without QSM
    b["ms"] = torch.tensor([1.0, 0.0])
    out["ms_logit"].grad = None
    T.loss_fn(out, b, torch.ones(4)).backward()
    assert float(out["ms_logit"].grad.abs().sum()) > 0.0


class _FakeRims:
    checkpoint = "new"

    def rim_probabilities(self, patches: np.ndarray) -> np.ndarray:
        return patches.reshape(len(patches), -1).mean(1).astype(np.float64)


def test_refresh_rims_rescores_stored_patches(tmp_path: Path) -> None:
    from msgate.model.patient.synthdata import refresh_rims

    n = 3
    lesion = np.zeros((n, 8), np.float32)
    lesion[:, T.RIM_FEATURE] = 9.0
    patches = np.stack([np.full((2, 4, 4, 4), v, np.float16) for v in (0.9, 0.1, 0.8, 0.7)])
    path = tmp_path / "c.npz"
    np.savez(path, index=np.array([1, 2, 3]), lesion=lesion, present=np.array([[1, 1], [1, 1], [0, 1]], np.float32),
             rim_patches=patches, rim_row=np.array([1, 1, 2, 3]), lesion_checkpoint=np.asarray("old"))
    assert refresh_rims(path, _FakeRims())  # type: ignore[arg-type]
    z = np.load(path)
    assert np.allclose(z["lesion"][:, T.RIM_FEATURE], np.log1p([1, 1, 0]))  # subject 3 has no QSM: 0
    assert str(z["lesion_checkpoint"]) == "new"
    assert not refresh_rims(path, _FakeRims())  # type: ignore[arg-type]  # already current


def test_ece_floor_separates_estimator_noise_from_miscalibration() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, (400, 4))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = (rng.random((400, 1)) > np.cumsum(p, 1)).sum(1)
    floor = ece_floor(p, n_draws=100)
    assert 0.0 < floor["mean"] < floor["p95"] < 0.12
    assert ece(p, y) < floor["p95"] + 0.02  # calibrated: inside the noise range
    sharp = np.exp(3 * logits) / np.exp(3 * logits).sum(1, keepdims=True)  # overconfident
    assert ece(sharp, y) > ece_floor(sharp, n_draws=100)["p95"] + 0.05


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))


def test_edss_label_is_the_closest_valid_observation(tmp_path: Path) -> None:
    import test_workers_double as double
    from conftest import make_settings

    from msgate.storage.models import Observation
    from msgate.storage.store import open_store
    from msgate.workers.training import candidates, edss_label

    store = open_store(make_settings(tmp_path / "home", "sqlite"))
    labelled, _ = double.make_study(store, seed=1, mrn="MRN1")
    double.make_study(store, seed=2, mrn="MRN2")  # patient without a label
    double.make_study(store, seed=3, mrn="MRN3")  # no HL7 patient at all
    p1, p2 = double.add_patient(store, mrn="MRN1"), double.add_patient(store, mrn="MRN2")

    def obs(pid: int, value: str, day: datetime, withdrawn: bool = False) -> Observation:
        return Observation(patient_id=pid, code="MS-EDSS", code_system="L", value_type="NM", withdrawn=withdrawn,
                           value_enc=store.cipher.encrypt(value, column="observation.value"), observed_at=day)
    with store.db.session() as session:  # the study date is 2026-11-01
        session.add(obs(p1, "6.5", datetime(2026, 1, 5, tzinfo=UTC)))  # outside 180 days
        session.add(obs(p1, "3.0", datetime(2026, 9, 1, tzinfo=UTC)))
        session.add(obs(p1, "4.5", datetime(2026, 10, 20, tzinfo=UTC)))  # closest
        session.add(obs(p1, "2.0", datetime(2026, 10, 30, tzinfo=UTC), withdrawn=True))
        session.add(obs(p2, "1.0", datetime(2025, 1, 1, tzinfo=UTC)))  # too old for MRN2's study
    cands, skipped = candidates(store)
    assert skipped == {"no_patient": 1} and {c.patient_id for c in cands} == {p1, p2}
    labels = {c.study_id: edss_label(store, c, "t") for c in cands}
    assert labels[labelled] == 4.5 and sorted(labels.values(), key=str) == [4.5, None]
    store.close()


def _random_data(n: int, grid: tuple[int, int, int], seed: int = 0) -> T.Data:
    from msgate.model.patient.ehr import N_COLUMNS

    rng = np.random.default_rng(seed)
    edss = rng.choice(np.arange(0, 10, 0.5), n).astype(np.float32)
    return T.Data(rng.random((n, 4, *grid)).astype(np.float16), np.ones((n, 2), np.float32),
                  rng.random((n, 8)).astype(np.float32), rng.normal(size=(n, N_COLUMNS)).astype(np.float32),
                  np.ones((n, N_COLUMNS), np.float32), edss,
                  np.digitize(edss, [2.75, 4.75, 6.75]).astype(np.int64), rng.integers(0, 2, n).astype(np.float32),
                  rng.integers(0, 3, n).astype(np.float32), np.arange(1, n + 1), np.arange(1, n + 1) // 2)


def test_cross_fitted_ensemble_calibrates_on_out_of_fold_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from msgate.model.patient import checkpoint, ensemble, presets
    from msgate.model.patient.calibration import softmax

    micro = presets.Preset("micro", (16, 16, 16), 12.0, (4, 4, 8, 8), (1, 1, 1, 1), 16, 32, 16, 0.2, 2, 8, 1e-3, 1,
                           "encoder.layer3", stem_stride=2)
    monkeypatch.setitem(presets.PRESETS, "micro", micro)
    data = _random_data(24, micro.grid)
    folds = ensemble.fold_of(data.group, 3, 0)
    assert all(len(set(folds[data.group == g])) == 1 for g in np.unique(data.group))  # patients stay whole
    recipe = ensemble.Recipe(members=3, folds=3, head="quadratic", calibration="temperature+prior")
    meta = ensemble.train_and_save(data, "micro", tmp_path / "m.pt", recipe, data_note="random", lesion_source="x")
    assert meta["calibration_rows"] == 24 and len(meta["members"]) == 3  # every row out-of-fold once
    ck = checkpoint.load(tmp_path / "m.pt")
    assert len(ck.nets) == 3 and type(ck.net.fusion).__name__ == "GatedLinearFusion"
    out = T.infer_ensemble(ck.nets, data, ck.scaler)
    p = softmax(out["edss_logits"], ck.t_edss)
    assert np.allclose(p.sum(1), 1) and meta["recipe"]["head"] == "quadratic"
    offset = np.asarray(meta["edss_prior_offset"])
    assert offset[0] == 0.0 and np.abs(offset).sum() > 0  # a fitted prior correction, folded into the nets
    alt = meta["alternative_calibration"]  # plain temperature, expressed on the shipped (prior-folded) logits
    assert np.allclose(alt["edss_prior_offset"], -meta["temperature_edss"] * offset / alt["temperature_edss"], atol=1e-3)


def test_cache_workers_do_not_hang_on_the_parents_openmp_pool(tmp_path: Path) -> None:
    """Two forked workers with torch's default thread count (no OMP_NUM_THREADS): before the workers were set
    to one thread, they deadlocked on the OpenMP pool the parent had started while loading the lesion model."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    code = ("import sys; from pathlib import Path; from msgate.model.patient.synthdata import build_cache; "
            "build_cache(Path(sys.argv[1]), 777, 2, 'tiny', workers=2, lesion_kind='lesion-model')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.npz")], env=env, check=True, timeout=120)
    with np.load(tmp_path / "c.npz") as f:
        assert f["index"].tolist() == [1, 2] and str(f["lesion_source"]) == "lesion-model"
