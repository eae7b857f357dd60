"""Lesion model API on tiny untrained networks: shapes, determinism, QSM-absent, checkpoint, FiLM wiring."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from msgate.model.lesions.model import DEFAULT_CHECKPOINT, build_model, load_lesion_model, save_lesion_model
from msgate.model.lesions.presets import get_preset
from msgate.model.lesions.rims import AsymmetricRimNet, StackedRimNet, build_rim_net, supcon_loss
from msgate.model.types import LESION_LOCATIONS, Volume

torch.set_num_threads(1)
TINY = dataclasses.replace(get_preset("tiny"), seg_channels=(4, 8), seg_strides=(2,), seg_roi=16, rim_patch=8,
                           rim_widths=(4, 8, 8), min_lesion_voxels=1, threshold=0.5)


def _volumes(qsm: bool = True) -> dict[str, Volume]:
    rng = np.random.default_rng(0)
    aff = np.diag([-2.0, -2.0, 2.0, 1.0])
    flair = rng.normal(1.0, 0.05, (12, 20, 18)).astype(np.float32) * 500
    flair[4:7, 8:11, 6:9] = 900.0  # 27 voxels
    flair[1:3, 2:4, 12:14] = 900.0  # 8 voxels
    vols = {"FLAIR": Volume(flair, aff, "FLAIR")}
    if qsm:
        vols["QSM"] = Volume(rng.normal(0, 0.002, (12, 20, 18)).astype(np.float32), aff, "QSM")
    return vols


class _Bright(torch.nn.Module):
    """Stand-in segmenter: bright FLAIR (normalised > 1.4) is lesion."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1] - 1.4) * 20.0


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return build_model(TINY, {"version": "test", "preset": "tiny", "training_data": "none"}, ("asymmetric", "stacked"))


def test_segment_shapes_and_geometry() -> None:
    m = build_model(TINY, {}, ("asymmetric",))
    m.seg = _Bright()
    vols = _volumes()
    les = m.segment(vols)
    assert sorted(round(f.volume_ml * 1000) for f in les.findings) == [64, 216]
    big = max(les.findings, key=lambda f: f.volume_ml)
    aff = vols["FLAIR"].affine_lps
    np.testing.assert_allclose(big.centroid_lps, aff[:3, :3] @ np.array([7.0, 9.0, 5.0]) + aff[:3, 3], atol=1e-6)
    scores = m.classify_rims(vols, les)
    assert scores.assessable and set(scores.probabilities) == {f.label for f in les.findings}
    assert all(p is not None and 0.0 <= p <= 1.0 for p in scores.probabilities.values())
    assert les.label_map.shape == vols["FLAIR"].data.shape
    assert les.label_map.dtype == np.int16
    assert sorted(f.label for f in les.findings) == sorted(int(v) for v in np.unique(les.label_map) if v > 0)
    for f in les.findings:
        assert f.rim_probability is None and f.location in LESION_LOCATIONS
        assert f.volume_ml == pytest.approx((les.label_map == f.label).sum() * 8 / 1000, rel=1e-3)
        assert len(f.centroid_lps) == 3


def test_eval_mode_is_deterministic(model) -> None:  # type: ignore[no-untyped-def]
    vols = _volumes()
    a, b = model.segment(vols), model.segment(vols)
    np.testing.assert_array_equal(a.label_map, b.label_map)
    ra, rb = model.classify_rims(vols, a), model.classify_rims(vols, b)
    assert ra.probabilities == rb.probabilities


def test_qsm_absent_is_not_assessable() -> None:
    m = build_model(TINY, {}, ("asymmetric",))
    m.seg = _Bright()
    vols = _volumes(qsm=False)
    les = m.segment(vols)
    assert len(les.findings) == 2
    scores = m.classify_rims(vols, les)
    assert scores.assessable is False
    assert all(p is None for p in scores.probabilities.values())
    assert all(f.rim_probability is None for f in scores.apply(les))


def test_checkpoint_metadata_round_trip(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "m.pt"
    save_lesion_model(model, path)
    back = load_lesion_model(path)
    assert back.meta == model.meta and back.preset == model.preset and set(back.rim) == set(model.rim)
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["version"] == "test" and side["preset_config"]["name"] == "tiny"
    x = torch.randn(3, 2, 8, 8, 8)
    for name in model.rim:
        np.testing.assert_allclose(back.rim_logits(x.numpy(), name), model.rim_logits(x.numpy(), name), rtol=1e-5)


def test_foreign_checkpoint_rejected(tmp_path: Path) -> None:
    torch.save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="checkpoint"):
        load_lesion_model(tmp_path / "x.pt")


def test_film_conditioning_changes_the_output() -> None:
    torch.manual_seed(1)
    net = AsymmetricRimNet((4, 8, 8)).eval()
    for film in net.films:  # trained FiLM is non-zero; the zero init makes it the identity
        torch.nn.init.normal_(film.weight, std=0.5)
    x = torch.randn(2, 2, 8, 8, 8)
    y = x.clone()
    y[:, 1] = torch.randn(2, 8, 8, 8)  # same QSM, different FLAIR
    with torch.no_grad():
        assert not torch.allclose(net(x)[0], net(y)[0])
        for film in net.films:
            torch.nn.init.zeros_(film.weight)
            torch.nn.init.zeros_(film.bias)
        torch.testing.assert_close(net(x)[0], net(y)[0])  # without FiLM, FLAIR cannot reach the output


def test_context_variant_gives_the_head_the_flair_stream_even_without_film() -> None:
    torch.manual_seed(1)
    net = build_rim_net("asymmetric_context", (4, 8, 8)).eval()
    assert isinstance(net, AsymmetricRimNet) and net.bounded and net.context
    x = torch.randn(2, 2, 8, 8, 8)
    y = x.clone()
    y[:, 1] = torch.randn(2, 8, 8, 8)  # same QSM, different FLAIR; FiLM still at its zero init
    with torch.no_grad():
        (lx, ex), (ly, _) = net(x), net(y)
        assert ex.shape == (2, 2 * 8 + 2 * 4)  # pooled QSM stream + pooled FLAIR stream
        assert not torch.allclose(lx, ly)  # the head sees FLAIR context directly
        plain = build_rim_net("asymmetric_bounded", (4, 8, 8)).eval()
        torch.testing.assert_close(plain(x)[0], plain(y)[0])  # the design without it does not (zero FiLM)
    q, f = net.embed_modalities(x)  # pretraining views are unchanged by the head
    assert q.shape == f.shape == (2, 32)


def test_stacked_baseline_and_supcon_shapes() -> None:
    net = StackedRimNet((4, 8, 8)).eval()
    logit, emb = net(torch.randn(3, 2, 8, 8, 8))
    assert logit.shape == (3,) and emb.shape == (3, 16)
    loss = supcon_loss(torch.randn(4, 5), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert torch.isfinite(loss) and loss > 0


def test_shipped_checkpoint_metadata() -> None:
    assert DEFAULT_CHECKPOINT.stat().st_size < 5_000_000
    m = load_lesion_model()
    assert m.preset.name == "tiny"
    assert {"version", "preset", "training_data", "seed"} <= set(m.meta)
    assert "not for clinical use" in m.meta["intended_use"]


def test_shipped_asymmetric_model_uses_flair() -> None:
    m = load_lesion_model()
    net = m.rim["asymmetric"]
    assert isinstance(net, AsymmetricRimNet)
    assert all(float(f.weight.detach().abs().sum()) > 0 for f in net.films)
    s = m.preset.rim_patch
    x = torch.randn(2, 2, s, s, s, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 1] = torch.flip(y[:, 1], dims=(1,))
    assert not np.allclose(m.rim_logits(x.numpy()), m.rim_logits(y.numpy()))


def test_full_preset_builds_from_the_same_code_path() -> None:
    full = get_preset("full")
    m = build_model(full, {}, ("asymmetric", "stacked"))
    s = full.rim_patch
    logits = m.rim_logits(np.zeros((1, 2, s, s, s), np.float32))
    assert logits.shape == (1,)
    with torch.no_grad():
        out = m.seg(torch.zeros(1, 2, 32, 32, 32))
    assert out.shape == (1, 1, 32, 32, 32)


def test_bounded_film_cannot_blow_up_qsm_features() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 2, 8, 8, 8)
    out = {}
    for bounded in (False, True):
        net = AsymmetricRimNet((4, 8, 8), bounded=bounded).eval()
        with torch.no_grad():
            base = net._streams(x, film=False)[0]
            for film in net.films:  # a FLAIR stream asking for a 1000x gain everywhere
                torch.nn.init.zeros_(film.weight)
                film.bias[: film.out_channels // 2] = 1000.0
            out[bounded] = float(net._streams(x, film=True)[0].abs().max() / base.abs().max())
    assert out[False] > 100.0  # the first version passes the gain on
    assert out[True] < 10.0  # bounded: at most x2 per scale


def test_rim_arch_from_checkpoint_metadata() -> None:
    from msgate.model.lesions.model import rim_arch

    assert rim_arch("asymmetric", {}) == "asymmetric"  # first-release checkpoints: FiLM v1
    assert rim_arch("stacked", {}) == "stacked"
    meta = {"rim_archs": {"asymmetric": "asymmetric_bounded", "stacked": "stacked"}}
    assert rim_arch("asymmetric", meta) == "asymmetric_bounded"
    m = build_model(TINY, meta, ("asymmetric", "stacked"))
    assert isinstance(m.rim["asymmetric"], AsymmetricRimNet) and m.rim["asymmetric"].bounded
    assert isinstance(m.rim["stacked"], StackedRimNet)


def _restored(vol: Volume, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> Volume:
    """The same voxels stored in another orientation: new (c, r, k) axis a is old axis ``perm[a]``,
    reversed where ``flips[a]``; the affine follows, so every voxel keeps its LPS position."""
    crk = vol.data.transpose(2, 1, 0).transpose(perm)
    for axis, flip in enumerate(flips):
        if flip:
            crk = np.flip(crk, axis)
    old_n = vol.data.shape[::-1]
    index = np.zeros((4, 4))
    index[3, 3] = 1.0
    for axis, (old, flip) in enumerate(zip(perm, flips)):
        index[old, axis] = -1.0 if flip else 1.0
        index[old, 3] = old_n[old] - 1 if flip else 0.0
    return Volume(np.ascontiguousarray(crk.transpose(2, 1, 0)), vol.affine_lps @ index, vol.role)


def test_lesion_results_do_not_depend_on_how_the_slices_are_stored() -> None:
    """The working grid kept the FLAIR's stored orientation, so the networks saw the head flipped or
    rotated for anything but the training storage ([-1,0,0,0,-1,0] axial): one head gave 5 to 7 lesions."""
    from msgate.model.lesions.data import synth_case
    from msgate.model.patient.lesionmodel import RealLesions

    case = synth_case(202, 3)
    lesions = RealLesions()
    reference = lesions(case.volumes).findings
    assert reference
    for perm, flips in (((0, 1, 2), (True, True, False)),   # axial as most scanners store it, [1,0,0,0,1,0]
                        ((1, 2, 0), (False, True, False)),  # sagittal slices
                        ((0, 2, 1), (True, True, False))):  # coronal slices
        stored = {role: _restored(v, perm, flips) for role, v in case.volumes.items()}
        assert np.isclose(stored["FLAIR"].data.sum(), case.volumes["FLAIR"].data.sum())
        got = lesions(stored).findings
        assert len(got) == len(reference), perm
        assert sorted(round(f.volume_ml, 3) for f in got) == sorted(round(f.volume_ml, 3) for f in reference)
        assert sorted(f.rim_probability for f in got) == pytest.approx(sorted(f.rim_probability for f in reference),
                                                                       abs=1e-4)


def test_qsm_on_the_flair_grid_covers_its_outer_slices() -> None:
    """Coverage resampled with nearest neighbour left the first and last working slices uncovered when
    the QSM had exactly the FLAIR's slices, so lesions there read as not assessable."""
    from msgate.model.lesions.grid import coverage, work_grid

    for directions in (np.diag([-1.0, -1.0, 1.0]), np.eye(3)):
        aff = np.eye(4)
        aff[:3, :3] = directions * np.array([1.0, 1.0, 3.0])
        flair = Volume(np.zeros((40, 32, 32), np.float32), aff, "FLAIR")
        qsm = Volume(np.zeros((40, 32, 32), np.float32), aff, "QSM")
        for spacing in (1.0, 2.0):
            assert coverage(qsm, work_grid(flair, spacing)).all()
        half = Volume(np.zeros((20, 32, 32), np.float32), aff, "QSM")  # the lower half only
        cov = coverage(half, work_grid(flair, 3.0))
        assert cov.any() and not cov.all()
