"""Geometry round trip: a written series read back by MONAI gives the generator's affine and voxels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from msgate.model.synth.anatomy import WarpParams, load_template, make_anatomy
from msgate.model.synth.contrasts import Acquisition, acquire
from msgate.model.synth.dicom_writer import SeriesInfo, StudyInfo, uid, volume_values, write_series

STUDY = StudyInfo("SYNTH^PATIENT0001", "SYN0000001", "19800101", "F", "045Y", uid("st"), uid("fr"),
                  "20260105", "101500", "SA0000001", "1", "SIEMENS", "Prisma", 3.0)


def _series(tmp_path: Path, role: str, mode: str, thickness: float):
    rng = np.random.default_rng(5)
    an = make_anatomy(load_template(2), WarpParams.sample(rng), 0.3, rng)
    img = {"FLAIR": 0.35 * an.wm + 0.55 * an.gm, "QSM": an.deep_chi - 0.02 * an.wm}[role].astype(np.float32)
    acq = Acquisition(role, mode, thickness, 0.03, 10000.0 if role == "QSM" else 2000.0)
    s = acquire(img, acq, an.affine, rng)
    write_series(s, STUDY, SeriesInfo(uid("se", role, mode), 1, role, role), tmp_path)
    return s


@pytest.mark.parametrize(("role", "mode", "thickness"), [("FLAIR", "3D", 0.0), ("FLAIR", "2D", 5.0), ("QSM", "3D", 0.0)])
def test_monai_reads_back_affine_and_voxels(tmp_path: Path, role: str, mode: str, thickness: float) -> None:
    from monai.transforms import LoadImage

    s = _series(tmp_path, role, mode, thickness)
    img = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)(str(tmp_path))
    assert tuple(img.shape[1:]) == s.pixels.shape
    np.testing.assert_allclose(np.asarray(img.affine), s.affine, atol=1e-3)
    np.testing.assert_allclose(np.asarray(img[0]), volume_values(s), atol=1e-3)
    if mode == "2D":
        assert s.affine[2, 2] == thickness
