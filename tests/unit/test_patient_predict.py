"""predict(): chain lesion source -> preprocessing -> network; flags, heatmap grid, determinism,
schema-hash refusal (random micro network saved as a checkpoint, small synthetic volumes)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from msgate.model.patient import checkpoint
from msgate.model.patient.ehr import N_COLUMNS, EhrScaler, ehr_vector
from msgate.model.patient.lesionsrc import HeuristicLesions
from msgate.model.patient.network import PatientNet
from msgate.model.patient.presets import Preset
from msgate.model.predict import load_model, predict
from msgate.model.types import EDSS_BINS, Case, Volume

torch.set_num_threads(1)
MICRO = Preset("micro", (16, 16, 16), 12.0, (4, 4, 8, 8), (1, 1, 1, 1), 16, 32, 16, 0.2, 1, 2, 1e-3, 1,
               "encoder.layer3")


def _volume(role: str, shape: tuple[int, int, int], spacing: float, seed: int) -> Volume:
    rng = np.random.default_rng(seed)
    k, r, c = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    brain = (k**2 + r**2 + c**2) < 0.7
    data = np.where(brain, 400.0, 0.0) + rng.normal(0, 5, shape)
    if role == "FLAIR":
        data[(k - 0.2) ** 2 + (r - 0.1) ** 2 + c**2 < 0.02] = 900.0
    if role == "QSM":
        data = np.where(brain, -0.02, 0.0) + rng.normal(0, 0.002, shape)
    aff = np.diag([-spacing, -spacing, spacing, 1.0])
    aff[:3, 3] = [60.0, 70.0, -50.0]
    return Volume(data.astype(np.float32), aff, role)  # type: ignore[arg-type]


def _case(case_id: str = "c1", roles: tuple[str, ...] = ("FLAIR", "QSM", "T1"), ehr: dict[str, object] | None = None) -> Case:
    vols = {role: _volume(role, (22, 24, 22) if role == "FLAIR" else (30, 24, 22), 5.0 if role == "FLAIR" else 4.0, i)
            for i, role in enumerate(roles)}
    values = {"age": 41.0, "sex": "F", "disease_duration": 5.0, "t25fw": 5.1, "nhpt": 20.0, "sdmt": 55,
              "nfl": 9.0, "ocb": "POS", "igg_index": 0.8, "relapses_2y": 1, "dmt": "fingolimod"}
    return Case(case_id, vols, ehr_vector(values if ehr is None else ehr))


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = PatientNet(MICRO).eval()
    scaler = EhrScaler(np.zeros(N_COLUMNS, np.float32), np.ones(N_COLUMNS, np.float32))
    path = tmp_path_factory.mktemp("ck") / "patient-micro.pt"
    checkpoint.save(path, net, scaler, {"preset": "micro", "preset_config": MICRO.to_dict(),
                                        "temperature_edss": 1.3, "temperature_ms": 1.1, "lesion_source": "heuristic",
                                        "training_data": "none (unit test)"})
    return path


@pytest.fixture(scope="module")
def model(ckpt_path: Path):  # type: ignore[no-untyped-def]
    return load_model(ckpt_path, lesion_source=HeuristicLesions())


def test_result_fields_ranges_and_heatmap_in_flair_grid(model) -> None:  # type: ignore[no-untyped-def]
    case = _case()
    (res,) = predict([case], model)
    assert len(res.edss_probabilities) == len(EDSS_BINS)
    assert abs(sum(res.edss_probabilities) - 1.0) < 1e-6
    assert 0.0 <= res.p_ms <= 1.0 and 0.0 <= res.uncertainty <= 1.0 and 0.0 <= res.edss_estimate <= 9.5
    assert res.confidence == pytest.approx(max(res.edss_probabilities))
    assert res.heatmap is not None and res.heatmap.shape == case.flair.data.shape
    assert res.heatmap.dtype == np.float32 and 0.0 <= res.heatmap.min() and res.heatmap.max() <= 1.0
    assert res.lesion_mask.shape == case.flair.data.shape and res.lesion_mask.dtype == np.int16
    assert set(res.ehr_contributions) == set(case.ehr.names)
    assert res.model_version.endswith("+micro")
    assert not any(f in res.flags for f in ("qsm_absent", "t1_absent"))


def test_missing_modalities_and_ehr_are_flagged(model) -> None:  # type: ignore[no-untyped-def]
    res_q, res_t, res_e = predict([_case("q", ("FLAIR", "T1")), _case("t", ("FLAIR", "QSM")),
                                   _case("e", ehr={"age": 50.0, "sex": "M"})], model)
    assert "qsm_absent" in res_q.flags and not res_q.rim_assessable and res_q.rim_count is None
    assert all(f.rim_probability is None for f in res_q.lesions)
    assert "t1_absent" in res_t.flags and "qsm_absent" not in res_t.flags
    assert "ehr_missing:nfl" in res_e.flags and "ehr_missing:age" not in res_e.flags
    assert res_e.ehr_contributions["nfl"] == 0.0


def test_review_flag_follows_threshold(model) -> None:  # type: ignore[no-untyped-def]
    strict = replace(model, review_confidence=1.01)
    lax = replace(model, review_confidence=0.0, review_uncertainty=1.01)
    assert "review" in predict([_case()], strict)[0].flags
    assert "review" not in predict([_case()], lax)[0].flags


def test_deterministic_and_batch_invariant(model) -> None:  # type: ignore[no-untyped-def]
    a = predict([_case()], model)[0]
    b = predict([_case()], model)[0]
    c = predict([_case("x", ("FLAIR",)), _case()], model)[1]
    assert a.edss_probabilities == b.edss_probabilities and a.uncertainty == b.uncertainty
    assert np.array_equal(a.heatmap, b.heatmap)
    assert np.allclose(a.edss_probabilities, c.edss_probabilities, atol=1e-6)
    assert abs(a.uncertainty - c.uncertainty) < 1e-6 and np.allclose(a.heatmap, c.heatmap, atol=1e-5)


def test_schema_mismatch_is_refused(ckpt_path: Path, tmp_path: Path) -> None:
    blob = torch.load(ckpt_path, weights_only=True)
    meta = json.loads(blob["meta_json"])
    meta["feature_schema_hash"] = "0" * 64
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": blob["state_dict"], "meta_json": json.dumps(meta)}, bad)
    with pytest.raises(checkpoint.SchemaMismatch, match="feature schema"):
        checkpoint.load(bad)


def test_flair_is_required(model) -> None:  # type: ignore[no-untyped-def]
    case = _case()
    with pytest.raises(ValueError, match="FLAIR"):
        predict([Case("nf", {"T1": case.volumes["T1"]}, case.ehr)], model)


def test_model_grid_round_trip_keeps_geometry() -> None:
    from msgate.model.patient.preprocess import prepare, to_flair_grid

    case = _case()
    mask = np.zeros(case.flair.data.shape, np.int16)
    mask[4:9, 5:11, 12:18] = 1  # an off-centre block, in [k, r, c]
    mi = prepare(case.volumes, mask, replace(MICRO, grid=(24, 24, 24), spacing_mm=5.0))
    back = to_flair_grid(mi.image[3], mi.affine_ras, case.flair)
    assert back.shape == mask.shape
    inside, outside = back[mask > 0].mean(), back[mask == 0].mean()
    assert inside > 0.5 and outside < 0.05


def test_small_ensemble_checkpoint_averages_members(tmp_path: Path) -> None:
    torch.manual_seed(1)
    nets = [PatientNet(MICRO).eval() for _ in range(2)]
    scaler = EhrScaler(np.zeros(N_COLUMNS, np.float32), np.ones(N_COLUMNS, np.float32))
    meta = {"preset": "micro", "preset_config": MICRO.to_dict(), "lesion_source": "heuristic"}
    checkpoint.save(tmp_path / "ens.pt", nets, scaler, meta)
    checkpoint.save(tmp_path / "one.pt", nets[0], scaler, meta)
    ens = load_model(tmp_path / "ens.pt", lesion_source=HeuristicLesions())
    one = load_model(tmp_path / "one.pt", lesion_source=HeuristicLesions())
    assert len(ens.ckpt.nets) == 2 and len(one.ckpt.nets) == 1
    r_ens, r_one = predict([_case()], ens)[0], predict([_case()], one)[0]
    assert abs(sum(r_ens.edss_probabilities) - 1.0) < 1e-6
    assert r_ens.edss_probabilities != r_one.edss_probabilities
    assert r_ens.heatmap is not None and r_ens.heatmap.shape == _case().flair.data.shape


def test_explain_heatmaps_both_heads_in_flair_grid(model) -> None:  # type: ignore[no-untyped-def]
    from msgate.model.predict import explain_heatmaps

    case = _case()
    maps = explain_heatmaps(case, model)
    assert set(maps) == {"edss", "diagnosis"}
    for m in maps.values():
        assert m.shape == case.flair.data.shape and 0.0 <= m.min() and m.max() <= 1.0
    assert np.allclose(maps["edss"], predict([case], model)[0].heatmap, atol=1e-5)


def test_shipped_patient_checkpoint_matches_the_shipped_lesion_model() -> None:
    """The packaged pair is consistent: the patient model learnt from the features of the lesion checkpoint
    that ships beside it (a retrained Rim+ net changes the Rim+ count the patient model reads)."""
    from msgate.model.patient.lesionmodel import checkpoint_id

    meta = json.loads(checkpoint.DEFAULT_PATH.with_suffix(".json").read_text())
    assert meta["lesion_source"] == "lesion-model"
    assert meta["lesion_checkpoint"] == checkpoint_id()
    assert meta["model_version"] == checkpoint.MODEL_VERSION
    assert meta["feature_schema_hash"] == checkpoint.schema_hash()


def test_the_model_runs_on_the_device_it_is_given() -> None:
    """The worker passes its device: load_model used to ignore it (no `device` parameter), so a GPU
    worker logged `device: cuda` and ran every network on the CPU."""
    from msgate.model.predict import load_model

    model = load_model(device="cpu")
    assert model.device == "cpu"
    devices = {p.device.type for n in model.ckpt.nets for p in n.parameters()}
    lesion = getattr(model.lesions, "model", None)
    if lesion is not None:
        assert lesion.device == "cpu"
    assert devices == {"cpu"}


def test_a_flair_that_does_not_span_the_brain_is_flagged_for_review() -> None:
    """A thin slab gave one 100 mL 'lesion' and a confident EDSS with no flag."""
    from msgate.model.predict import MIN_HEAD_FOOT_MM, _flags, head_foot_extent, load_model
    from msgate.model.types import Case, EhrVector, Volume

    model = load_model()
    ehr = EhrVector(np.zeros(1, np.float32), np.ones(1, bool), ("age",))
    slab = Volume(np.zeros((5, 64, 64), np.float32), np.diag([1.0, 1.0, 3.0, 1.0]), "FLAIR")
    sagittal = Volume(np.zeros((40, 128, 128), np.float32),  # 40 sagittal slices; head-foot runs in-plane
                      np.array([[0.0, 0, 1, 0], [1, 0, 0, 0], [0, -1.2, 0, 0], [0, 0, 0, 1]]), "FLAIR")
    assert head_foot_extent(slab) == 12.0 and head_foot_extent(sagittal) == pytest.approx(127 * 1.2)
    flags = _flags(Case("c", {"FLAIR": slab}, ehr), 0.9, 0.1, model)
    assert "partial_coverage" in flags and "review" in flags and MIN_HEAD_FOOT_MM == 100.0
    assert "partial_coverage" not in _flags(Case("c", {"FLAIR": sagittal}, ehr), 0.9, 0.1, model)


def test_lesions_outside_a_qsm_slab_are_not_assessed() -> None:
    """A QSM slab (smaller field of view than the FLAIR) was zero-filled on the working grid, so lesions
    outside it were scored on empty patches and reported Rim- (assessed) instead of not assessable."""
    from msgate.model.patient.lesionmodel import RealLesions
    from msgate.model.patient.synthdata import synth_case
    from msgate.model.predict import _flags, load_model

    case, _ = synth_case(202, 4)
    qsm = case.volumes["QSM"]
    k0, n = qsm.data.shape[0] // 2 + 5, int(round(40 / qsm.spacing[2]))
    shift = np.eye(4)
    shift[2, 3] = k0
    slab = Volume(np.ascontiguousarray(qsm.data[k0:k0 + n]), qsm.affine_lps @ shift, "QSM")
    lesions = RealLesions()
    full = lesions(case.volumes).findings
    part = lesions({**case.volumes, "QSM": slab}).findings
    assert all(f.rim_probability is not None for f in full)
    outside = [f for f in part if f.rim_probability is None]
    assert 0 < len(outside) < len(part)
    z = [(slab.affine_lps @ [0, 0, k, 1])[2] for k in (0, n - 1)]
    lo, hi = min(z), max(z)
    assert all(f.rim_probability is not None for f in part if lo + 8 <= f.centroid_lps[2] <= hi - 8)
    assert all(f.rim_probability is None for f in part if not lo - 8 <= f.centroid_lps[2] <= hi + 8)
    flags = _flags(Case("c", {**case.volumes, "QSM": slab}, case.ehr), 0.9, 0.1, load_model(), part)
    assert "qsm_partial_coverage" in flags


def test_a_patient_checkpoint_refuses_another_lesion_checkpoint(tmp_path: Path) -> None:
    """The patient model's lesion features come from one lesion checkpoint; another one installed beside
    it loaded silently (the 0.1.0 -> 0.2.0 lesion swap the model card describes)."""
    from msgate.errors import ConfigError

    blob = torch.load(checkpoint.DEFAULT_PATH, map_location="cpu", weights_only=True)
    meta = json.loads(blob["meta_json"])
    assert meta["lesion_checkpoint"] and meta["lesion_source"] == "lesion-model"
    load_model()  # the shipped pair
    blob["meta_json"] = json.dumps({**meta, "lesion_checkpoint": "000000000000"}, sort_keys=True)
    other = tmp_path / "patient-other.pt"
    torch.save(blob, other)
    with pytest.raises(ConfigError, match="lesion checkpoint 000000000000"):
        load_model(other)


def test_a_qsm_map_in_other_units_is_flagged_for_review() -> None:
    """A QSM exported in ppb (x1000) makes every lesion look paramagnetic; nothing checked the scale."""
    from msgate.model.predict import _flags, load_model, qsm_scale_suspect

    ppm = _case().volumes["QSM"]
    ppb = Volume(ppm.data * 1000.0, ppm.affine_lps, "QSM")
    assert not qsm_scale_suspect(ppm) and qsm_scale_suspect(ppb)
    case = _case()
    flags = _flags(Case(case.case_id, {**case.volumes, "QSM": ppb}, case.ehr), 0.9, 0.1, load_model())
    assert "qsm_scale_suspect" in flags and "review" in flags
    assert "qsm_scale_suspect" not in _flags(case, 0.9, 0.1, load_model())
