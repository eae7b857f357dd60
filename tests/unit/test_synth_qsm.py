"""Realistic QSM: reconstruction noise, streaks, underestimation, partial-volume rims, veins, isolation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from msgate.model.synth import veins
from msgate.model.synth.anatomy import WarpParams, load_template, make_anatomy
from msgate.model.synth.cohort import CohortConfig, simulate_subject
from msgate.model.synth.lesions import LesionSpec, _rim, place_lesions
from msgate.model.synth.qsm import dipole_kernel, reconstruct, tkd_inverse


@pytest.fixture(scope="module")
def anatomy():  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(11)
    return make_anatomy(load_template(2), WarpParams.sample(rng), 0.2, rng)


def _noise_only(an, noise_1mm: float, spacing: float = 2.0) -> np.ndarray:  # type: ignore[no-untyped-def]
    z = np.zeros(an.wm.shape, np.float32)
    white = np.random.default_rng(0).standard_normal(z.shape, dtype=np.float32)
    with_noise = reconstruct(z, white, an.brain, an.dout, spacing, noise_1mm, np.random.default_rng(1))
    without = reconstruct(z, np.zeros_like(white), an.brain, an.dout, spacing, noise_1mm, np.random.default_rng(1))
    return (with_noise - without)[an.brain & (an.dout > 10)]


def test_noise_sd_follows_the_1mm_level_and_voxel_volume(anatomy) -> None:  # type: ignore[no-untyped-def]
    for level in (0.006, 0.018):
        sd = float(_noise_only(anatomy, level).std())
        assert sd == pytest.approx(level / 2.0**1.5, rel=0.25)


def test_reconstruction_noise_is_streaky_not_white(anatomy) -> None:  # type: ignore[no-untyped-def]
    z = np.zeros(anatomy.wm.shape, np.float32)
    white = np.random.default_rng(0).standard_normal(z.shape, dtype=np.float32)
    rec = (reconstruct(z, white, None, None, 2.0, 0.012, np.random.default_rng(1))
           - reconstruct(z, np.zeros_like(white), None, None, 2.0, 0.012, np.random.default_rng(1)))  # noise part
    power = np.abs(np.fft.rfftn(rec)) ** 2
    d = dipole_kernel(rec.shape, 2.0)  # type: ignore[arg-type]
    cone = (np.abs(d) < 0.1) & (d != 0)
    far = np.abs(d) > 0.3
    assert power[cone].mean() > 2.0 * power[far].mean()  # white noise would give a ratio of 1


def test_tkd_underestimates_like_the_literature(anatomy) -> None:  # type: ignore[no-untyped-def]
    chi = (-0.02 * anatomy.wm + 0.01 * anatomy.gm + anatomy.deep_chi).astype(np.float32)
    d = dipole_kernel(chi.shape, 2.0)  # type: ignore[arg-type]
    f = np.fft.rfftn(chi)
    spec = f * tkd_inverse(d, 0.2) * d
    spec[0, 0, 0] = f[0, 0, 0]
    rec = np.fft.irfftn(spec, s=chi.shape, axes=(0, 1, 2))
    m = anatomy.brain & (anatomy.dout > 10)
    slope = np.polyfit(chi[m], rec[m], 1)[0]
    assert 0.7 < slope < 0.95


def _sphere_d(n: int, sp: float, radius_mm: float) -> np.ndarray:
    g = np.stack(np.meshgrid(*[np.arange(float(n)) - n // 2] * 3, indexing="ij"))
    return (np.sqrt((g**2).sum(0)) * sp / radius_mm).astype(np.float32)


def test_rim_band_has_partial_volume_and_partial_coverage() -> None:
    box, centre = (slice(0, 24),) * 3, np.array([12.0, 12.0, 12.0])
    full = _rim(_sphere_d(24, 2.0, 6.0), centre, box, 2.0, 1.0, 1.0, np.random.default_rng(0))
    assert 0.3 < full.max() <= 0.55  # a 1 mm band fills at most about half a 2 mm voxel
    fine_box, fine_c = (slice(0, 40),) * 3, np.array([20.0, 20.0, 20.0])
    fine = _rim(_sphere_d(40, 0.5, 6.0), fine_c, fine_box, 0.5, 1.0, 1.0, np.random.default_rng(0))
    assert fine.max() > 0.95  # at 0.5 mm voxels the band is resolved
    half = _rim(_sphere_d(24, 2.0, 6.0), centre, box, 2.0, 1.0, 0.5, np.random.default_rng(0))
    assert 0.35 < half.sum() / full.sum() < 0.65


def test_ms_lesions_get_central_veins_only_in_the_susceptibility_map(anatomy) -> None:  # type: ignore[no-untyped-def]
    specs = [LesionSpec("ovoid", "deep_wm", (5.0, 3.5, 3.0)) for _ in range(12)]
    maps = place_lesions(specs, anatomy, np.random.default_rng(4))
    assert maps.vein_ppm is not None and maps.vein_ppm.max() > 0.01
    near = ndimage.binary_dilation(maps.labels > 0, iterations=1)
    inside = [maps.vein_ppm[maps.labels == les.id].max() for les in maps.lesions]
    assert np.mean(np.asarray(inside) > 0.005) > 0.3  # most have a central vein (60 % drawn)
    assert maps.vein_ppm[~near].max() > 0.01  # and medullary veins elsewhere


def test_susceptibility_draws_leave_flair_t1_and_later_draws_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = CohortConfig(Path("."), 5, {"ms": 1.0}, resolution=2, protocol="3d")
    a = simulate_subject(cfg, 2)
    monkeypatch.setattr(veins, "JUXTA_VEIN_P", 1.0)  # many more draws from the susceptibility stream
    monkeypatch.setitem(veins.CENTRAL_VEIN_P, "ovoid", 0.0)
    b = simulate_subject(cfg, 2)
    for sa, sb in zip(a.series, b.series):
        if sa.acq.role == "QSM":
            assert not np.array_equal(sa.pixels, sb.pixels)
        else:
            np.testing.assert_array_equal(sa.pixels, sb.pixels)
    np.testing.assert_array_equal(a.lesions.labels, b.lesions.labels)
    assert a.rng.random() == b.rng.random()  # EHR and HL7 draws come next: unchanged


def test_qsm_noise_is_realistic_and_rims_bounded() -> None:
    cfg = CohortConfig(Path("."), 3, {"ms": 1.0}, resolution=2, protocol="3d")
    sub = simulate_subject(cfg, 1)
    qsm = next(s for s in sub.series if s.acq.role == "QSM")
    q = qsm.pixels.astype(np.float32) * np.float32(qsm.slope)
    rim = sub.lesions.rim_ppm
    assert rim.max() <= 0.06 + 1e-6
    wm = sub.anatomy.brain & (sub.anatomy.wm > 0.9) & (sub.lesions.labels == 0) & (rim == 0)
    hp = q - ndimage.uniform_filter(q, 3)
    assert 0.002 < float(hp[wm].std()) < 0.02  # ppm: realistic at 2 mm, not 0.0004-0.0012 as before


def test_qsm_is_reproducible_per_seed() -> None:
    cfg = CohortConfig(Path("."), 9, {"ms": 1.0}, resolution=2, protocol="3d")
    a, b = simulate_subject(cfg, 1), simulate_subject(cfg, 1)
    qa = next(s for s in a.series if s.acq.role == "QSM")
    qb = next(s for s in b.series if s.acq.role == "QSM")
    np.testing.assert_array_equal(qa.pixels, qb.pixels)
