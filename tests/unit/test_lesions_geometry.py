"""Lesion model geometry: connected components, volumes and centroids, working-grid round trips."""

from __future__ import annotations

import numpy as np
import pytest

from msgate.model.lesions.grid import from_grid, normalise, to_grid, work_grid
from msgate.model.lesions.patches import crop
from msgate.model.lesions.segment import components, measure
from msgate.model.types import Volume


def _affine(spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    a = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    a[:3, 3] = origin
    return a


def test_components_volumes_and_centroids_on_hand_made_mask() -> None:
    mask = np.zeros((10, 12, 14), bool)  # [k, r, c]
    mask[2:4, 3:5, 4:6] = True  # 8 voxels, centre (k, r, c) = (2.5, 3.5, 4.5)
    mask[7, 9, 11] = True  # single voxel: dropped with min_voxels=2
    mask[6:9, 1, 1] = True  # 3 voxels in a line, centre (7, 1, 1)
    lab, n = components(mask, min_voxels=2)
    assert n == 2
    aff = _affine((0.5, 1.0, 2.0), (10.0, 20.0, -30.0))  # voxel 1 mm^3
    found = {round(ml * 1000): cen for _, ml, cen in measure(lab, aff)}
    assert set(found) == {8, 3}
    c, r, k = 4.5, 3.5, 2.5
    np.testing.assert_allclose(found[8], (10.0 - 0.5 * c, 20.0 - 1.0 * r, -30.0 + 2.0 * k))
    np.testing.assert_allclose(found[3], (10.0 - 0.5, 20.0 - 1.0, -30.0 + 2.0 * 7))


def test_components_diagonal_neighbours_join() -> None:
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True
    _, n = components(mask, 1)
    assert n == 1


def test_work_grid_round_trip_anisotropic_flair() -> None:
    data = np.zeros((8, 20, 20), np.float32)  # 8 slices of 5 mm, 2 mm in plane
    data[3:5, 8:12, 6:10] = 1.0
    flair = Volume(data, _affine((2.0, 2.0, 5.0), (50.0, 60.0, -20.0)), "FLAIR")
    grid = work_grid(flair, 2.0)
    assert grid.shape == (20, 20, 20)
    np.testing.assert_allclose(grid.spacing, (2.0, 2.0, 2.0))
    arr = to_grid(flair, grid, order=0)
    back = from_grid((arr > 0.5).astype(np.int16), grid)
    assert back.shape == data.shape
    assert back.dtype == np.int16
    np.testing.assert_array_equal(back > 0, data > 0.5)


def test_other_modality_resampled_through_affines() -> None:
    flair = Volume(np.zeros((10, 10, 10), np.float32), _affine((2.0, 2.0, 2.0), (0.0, 0.0, 0.0)), "FLAIR")
    qdata = np.zeros((20, 20, 20), np.float32)  # 1 mm QSM, same corner
    qdata[10:12, 4:6, 8:10] = 1.0
    qsm = Volume(qdata, _affine((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), "QSM")
    arr = to_grid(qsm, work_grid(flair, 2.0), order=0)  # (c, r, k)
    assert arr.shape == (10, 10, 10)
    hot = np.argwhere(arr > 0.5)
    assert hot.size and np.all((hot[:, 0] >= 4) & (hot[:, 0] <= 5) & (hot[:, 2] >= 5) & (hot[:, 2] <= 6))


def test_normalise_keeps_qsm_units_and_scales_flair() -> None:
    q = normalise("QSM", np.full((4, 4, 4), 0.05, np.float32))
    assert q[0, 0, 0] == pytest.approx(1.0)
    f = np.zeros((10, 10, 10), np.float32)
    f[2:8, 2:8, 2:8] = 800.0
    assert normalise("FLAIR", f)[5, 5, 5] == pytest.approx(1.0)


def test_crop_pads_at_the_border() -> None:
    arr = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    p = crop(arr, np.array([0.0, 0.0, 0.0]), 4)
    assert p.shape == (4, 4, 4)
    assert p[2, 2, 2] == arr[0, 0, 0] and p[0, 0, 0] == 0.0


@pytest.mark.parametrize(("mode", "thickness"), [("3D", 0.0), ("2D", 5.0)])
def test_dicom_reader_matches_in_memory_volume(tmp_path, mode: str, thickness: float) -> None:  # type: ignore[no-untyped-def]
    from msgate.model.lesions.data import _read_series, series_to_volume
    from msgate.model.synth.contrasts import Acquisition, acquire
    from msgate.model.synth.dicom_writer import SeriesInfo, StudyInfo, uid, write_series

    rng = np.random.default_rng(3)
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    ras[:3, 3] = (-20.0, -30.0, -10.0)
    img = rng.random((12, 14, 10)).astype(np.float32)
    s = acquire(img, Acquisition("FLAIR", mode, thickness, 0.03, 2000.0), ras, rng)
    st = StudyInfo("SYNTH^P", "SYN1", "19800101", "F", "045Y", uid("st"), uid("fr"), "20260105", "101500",
                   "SA1", "1", "SIEMENS", "Prisma", 3.0)
    write_series(s, st, SeriesInfo(uid("se", mode), 1, "FLAIR", "FLAIR"), tmp_path)
    got, want = _read_series(tmp_path, "FLAIR"), series_to_volume(s, "FLAIR")
    assert got.data.shape == want.data.shape
    np.testing.assert_allclose(got.affine_lps, want.affine_lps, atol=1e-3)
    np.testing.assert_allclose(got.data, want.data, atol=1e-3)


def test_synth_case_truth_lands_on_lesions_with_2d_flair() -> None:
    from msgate.model.lesions.data import synth_case
    from msgate.model.lesions.train import work_truth

    case = synth_case(11, 2, protocol="2d")
    flair = case.volumes["FLAIR"]
    assert flair.spacing[2] > 2.5  # thick 2D slices, a grid other than the truth's
    grid = work_grid(flair, 2.0)
    truth = work_truth(case, grid)
    arr = normalise("FLAIR", to_grid(flair, grid))
    assert truth.max() > 0
    assert float(arr[truth > 0].mean()) > 1.2 * float(np.median(arr[arr > 0.3]))  # lesions are bright
