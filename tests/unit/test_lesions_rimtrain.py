"""Rim+ training recipe and ablation statistics: augmentation geometry, label-blind pretraining, learning,
paired bootstrap."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from msgate.model.lesions.ablation import PatchSet, paired_bootstrap, pr_roc
from msgate.model.lesions.presets import get_preset
from msgate.model.lesions.rimtrain import SWEEP, RimRecipe, augment, train_variant

torch.set_num_threads(1)
TINY = dataclasses.replace(get_preset("tiny"), rim_patch=8, rim_widths=(4, 8, 8))
RECIPE = RimRecipe(pretrain_epochs=1, finetune_epochs=6, batch=16, lr=5e-3, qsm_noise=0.0)


def _toy(n: int, seed: int) -> PatchSet:
    """FLAIR: a bright cube in the middle; QSM: a bright shell around it for Rim+, noise for Rim-."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.3, (n, 2, 8, 8, 8)).astype(np.float32)
    x[:, 1] += 1.0
    x[:, 1, 3:5, 3:5, 3:5] += 1.5
    y = (np.arange(n) % 3 == 0).astype(np.int8)
    shell = np.zeros((8, 8, 8), bool)
    shell[2:6, 2:6, 2:6] = True
    shell[3:5, 3:5, 3:5] = False
    x[y == 1, 0] += 1.5 * shell
    return PatchSet(x.astype(np.float16), y, np.arange(n, dtype=np.int32) // 4, np.full(n, 8, np.int32))


def test_augment_keeps_the_b0_axis() -> None:
    x = torch.zeros(32, 2, 8, 8, 8)
    x[..., 2] = 1.0  # a plane normal to z (B0): QSM streaks have a fixed relation to it
    out = augment(x, torch.Generator().manual_seed(0), 0.0)
    planes = (out[:, 0] > 0.5).float().mean(dim=(1, 2))  # fraction set per z index
    assert torch.all(planes.max(dim=1).values > 0.99)  # still one full plane normal to z in every sample
    assert not torch.equal(out, x.expand_as(out))  # and something did change


def test_pretraining_never_reads_pool_labels() -> None:
    labelled, pool = _toy(48, 0), _toy(64, 1)
    lied = dataclasses.replace(pool, y=1 - pool.y)
    nets = [train_variant("asymmetric", TINY, labelled, p, 0, RECIPE) for p in (pool, lied)]
    x = torch.from_numpy(_toy(12, 2).x.astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(nets[0](x)[0], nets[1](x)[0])


@pytest.mark.parametrize("variant", ["asymmetric", "stacked", *sorted(SWEEP)])
def test_every_variant_learns_a_visible_rim(variant: str) -> None:
    """The design, the baseline and the validation sweep's conditioning variants are real, trainable nets (the
    cross-attention one is built for the tiny preset's 16^3 patches, so it gets the toy patches at twice the size)."""
    up = 2 if "xattn" in variant else 1

    def grow(ps: PatchSet) -> PatchSet:
        x = ps.x.repeat(up, axis=2).repeat(up, axis=3).repeat(up, axis=4)
        return dataclasses.replace(ps, x=x)

    net = train_variant(variant, TINY, grow(_toy(96, 3)), None, 0, RECIPE)
    test = grow(_toy(60, 4))
    with torch.no_grad():
        logit = net(torch.from_numpy(test.x.astype(np.float32)))[0].numpy()
        if up > 1:
            with pytest.raises(ValueError, match="tokens"):
                net(torch.from_numpy(_toy(2, 5).x.astype(np.float32)))
    roc, pr = pr_roc(test.y, logit)
    assert roc > 0.9 and pr > 0.8


def test_paired_bootstrap_difference_interval() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(600) < 0.1).astype(int)
    subject = np.arange(600) // 6
    good = y * 2.0 + rng.normal(0, 1, 600)
    bad = y * 0.5 + rng.normal(0, 1, 600)
    res = paired_bootstrap(y, subject, {"good": good, "bad": bad}, [("good", "bad")], n_boot=200)
    d = res["delta pr_auc good - bad"]
    assert d["value"] > 0 and d["ci95"][0] > 0  # a clear difference is resolved
    same = paired_bootstrap(y, subject, {"a": good, "b": good.copy()}, [("a", "b")], n_boot=50)
    assert same["delta pr_auc a - b"]["ci95"] == [0.0, 0.0]  # pairing: identical scores, zero-width interval
    lo, hi = res["pr_auc good"]["ci95"]
    assert lo <= res["pr_auc good"]["value"] <= hi


def test_retrain_rims_leaves_the_segmenter_alone() -> None:
    from msgate.model.lesions.model import build_model
    from msgate.model.lesions.rimfit import retrain_rims

    model = build_model(TINY, {"version": "0.1.0", "seed": 0, "training_data": "seg part; Rim+ old"},
                        ("asymmetric", "stacked"))
    seg = {k: v.clone() for k, v in model.seg.state_dict().items()}
    loc = {k: v.clone() for k, v in model.loc.state_dict().items()}
    small = dataclasses.replace(TINY, rim_subjects=2, rim_pool_subjects=1, pretrain_epochs=1, finetune_epochs=1,
                                rim_batch=4, seg_steps=1)
    retrain_rims(model, small, 0, quiet=True)
    for k, v in model.seg.state_dict().items():
        torch.testing.assert_close(v, seg[k])
    for k, v in model.loc.state_dict().items():
        torch.testing.assert_close(v, loc[k])
    assert model.preset.seg_steps == TINY.seg_steps and model.preset.rim_subjects == 2
    assert model.meta["rim_archs"]["asymmetric"] == "asymmetric_bounded"
    assert set(model.rim) == {"asymmetric", "asymmetric_nopretrain", "stacked"}
    assert model.meta["training_data"].startswith("seg part; Rim+ seed 1")
    assert model.meta["rim_train_lesions"]["pool_unlabelled"] > 0


def test_seed_mean_bootstrap_averages_seeds_on_shared_resamples() -> None:
    from msgate.model.lesions.ablation import seed_mean_bootstrap

    rng = np.random.default_rng(1)
    y = (rng.random(800) < 0.1).astype(int)
    subject = np.arange(800) // 8
    strong = [y * 2.0 + rng.normal(0, 1, 800) for _ in range(3)]
    weak = [y * 0.7 + rng.normal(0, 1, 800) for _ in range(3)]
    res = seed_mean_bootstrap(y, subject, {"strong": strong, "weak": weak}, [("strong", "weak")], n_boot=150)
    want = np.mean([pr_roc(y, s)[1] for s in strong])
    assert res["pr_auc strong"]["value"] == round(float(want), 4)  # the mean over seeds, not an ensemble
    d = res["delta pr_auc strong - weak"]
    assert d["ci95"][0] > 0 and d["p_le_0"] < 0.025
    flipped = seed_mean_bootstrap(y, subject, {"strong": strong, "weak": weak}, [("weak", "strong")], n_boot=150)
    assert flipped["delta pr_auc weak - strong"]["ci95"][1] < 0 and flipped["delta pr_auc weak - strong"]["p_le_0"] > 0.975


def test_shipped_checkpoint_is_training_code_0_2_0_and_the_cli_default() -> None:
    import inspect

    from msgate.cli.train_cmd import lesions
    from msgate.model.lesions.model import load_lesion_model
    from msgate.model.lesions.presets import with_rim_recipe
    from msgate.model.lesions.rimfit import VERSION as RIM_VERSION
    from msgate.model.lesions.train import VERSION

    tiny = get_preset("tiny")
    shipped = load_lesion_model()
    assert shipped.version == RIM_VERSION == "0.2.0" and VERSION == "0.1.0"
    assert shipped.preset == with_rim_recipe(tiny, "0.2.0")  # `train lesions --preset tiny` (default recipe)
    assert inspect.signature(lesions).parameters["rim_recipe"].default.default == shipped.version
    assert "Rim+ classifiers only" in shipped.meta["retrained"]  # `make model-rims`: the segmenter kept
    assert with_rim_recipe(tiny, "0.1.0") is tiny
    v2 = with_rim_recipe(tiny, "0.2.0")
    assert (v2.rim_widths, v2.pretrain_epochs, v2.rim_pool_subjects) == ((16, 32, 48), 6, 360)
    assert dataclasses.replace(v2, rim_widths=tiny.rim_widths, pretrain_epochs=10, rim_pool_subjects=0) == tiny
    with pytest.raises(ValueError, match="recipe"):
        with_rim_recipe(tiny, "9.9")


def test_shipped_checkpoint_uses_the_bounded_film_form() -> None:
    from msgate.model.lesions.model import load_lesion_model
    from msgate.model.lesions.rims import AsymmetricRimNet

    m = load_lesion_model()
    assert m.meta["rim_archs"]["asymmetric"] == "asymmetric_bounded"
    net = m.rim["asymmetric"]
    assert isinstance(net, AsymmetricRimNet) and net.bounded
    assert set(m.rim) == {"asymmetric", "asymmetric_nopretrain", "stacked"}


def test_train_lesion_model_with_rim_recipe_0_2_0_records_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from msgate.model.lesions.model import load_lesion_model, save_lesion_model
    from msgate.model.lesions.rims import AsymmetricRimNet
    from msgate.model.lesions.train import train_lesion_model

    micro = dataclasses.replace(TINY, name="micro", seg_channels=(4, 8), seg_strides=(2,), seg_patch=16, seg_roi=16,
                                seg_batch=1, seg_steps=1, seg_subjects=1, loc_epochs=1, rim_subjects=2,
                                rim_pool_subjects=1, pretrain_epochs=1, finetune_epochs=1, rim_batch=4)
    model = train_lesion_model(micro, 0, tmp_path / "m.jsonl", quiet=True, rim_recipe="0.2.0")
    assert model.version == "0.2.0" and model.meta["rim_archs"]["asymmetric"] == "asymmetric_bounded"
    assert "pretraining pool: subjects 3-3 of seed 1" in model.meta["training_data"]
    save_lesion_model(model, tmp_path / "m.pt")
    back = load_lesion_model(tmp_path / "m.pt")
    net = back.rim["asymmetric"]
    assert isinstance(net, AsymmetricRimNet) and net.bounded


def test_a_synth_folder_is_the_in_memory_cohort_and_trains(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``train lesions --data DIR`` / ``evaluate lesions --data DIR`` read a ``msgate synth`` folder: its
    subjects are the in-memory ones (DICOM round trip), and the micro preset trains on them end to end."""
    from msgate.model.lesions.data import load_synth_folder, synth_case
    from msgate.model.lesions.train import train_lesion_model
    from msgate.model.synth.cohort import generate_cohort

    mix = {"ms": 1.0, "csvd": 0.0}
    generate_cohort(tmp_path / "cohort", 2, seed=5, resolution=2, mix=mix, protocol="3d")
    cases = list(load_synth_folder(tmp_path / "cohort"))
    assert len(cases) == 2
    for index, case in enumerate(cases, start=1):
        mem = synth_case(5, index, resolution=2, mix=mix)
        assert case.subject == mem.subject and case.diagnosis == mem.diagnosis == "ms"
        assert case.lesions == mem.lesions and np.array_equal(case.labels, mem.labels)
        assert np.allclose(case.labels_affine, mem.labels_affine, atol=1e-4)
        assert set(case.volumes) == set(mem.volumes)
        for role, vol in case.volumes.items():
            want = mem.volumes[role]
            assert vol.data.shape == want.data.shape and np.allclose(vol.affine_lps, want.affine_lps, atol=1e-3)
            scale = float(np.abs(want.data).max())
            assert float(np.abs(vol.data - want.data).max()) <= 1e-3 * scale  # stored as scaled integers
    micro = dataclasses.replace(TINY, name="micro", seg_channels=(4, 8), seg_strides=(2,), seg_patch=16, seg_roi=16,
                                seg_batch=1, seg_steps=1, seg_subjects=2, loc_epochs=1, rim_subjects=2,
                                pretrain_epochs=1, finetune_epochs=1, rim_batch=4)
    model = train_lesion_model(micro, 0, tmp_path / "m.jsonl", quiet=True, data=tmp_path / "cohort")
    assert "msgate synth folder cohort" in model.meta["training_data"]
    assert model.meta["rim_train_lesions"]["n"] == sum(len(c.lesions) for c in cases) > 0
