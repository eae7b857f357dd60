"""Volume assembly: ordering, duplicates, gaps, tilt, localisers, multi-frame, compressed and broken data."""

from __future__ import annotations

import io

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from msgate.errors import Rejected
from msgate.workers.volume import assemble

IOP = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _slice(z: float, *, value: int | None = None, iop: list[float] = IOP, x: float = 0.0, rows: int = 8,
           instance: int = 1, rle: bool = False) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    ds.ImagePositionPatient = [x, 0.0, z]
    ds.ImageOrientationPatient = iop
    ds.PixelSpacing = [0.5, 0.75]
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = rows, 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1
    pixels = np.full((rows, 8), int(z * 10) if value is None else value, dtype=np.uint16)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if rle:
        ds.compress(RLELossless, pixels)
    else:
        ds.PixelData = pixels.tobytes()
    return ds


def test_sorted_along_normal_with_lps_affine_and_rescale() -> None:
    result = assemble([_slice(z) for z in (4.0, 0.0, 2.0, 6.0)], "FLAIR")
    vol = result.volume
    assert result.sources == (1, 2, 0, 3)
    assert vol.data.shape == (4, 8, 8)
    assert [float(vol.data[k, 0, 0]) for k in range(4)] == [-1.0, 39.0, 79.0, 119.0]  # 2 * z*10 - 1
    np.testing.assert_allclose(vol.affine_lps[:3, :], [[0.75, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 2.0, 0]])
    assert vol.spacing == (0.75, 0.5, 2.0)


def test_duplicate_positions_keep_the_latest_instance() -> None:
    result = assemble([_slice(0.0), _slice(1.0, value=5, instance=2), _slice(1.0, value=9, instance=7),
                       _slice(2.0)], "FLAIR")
    assert result.volume.data.shape[0] == 3 and "duplicate_positions" in result.flags
    assert float(result.volume.data[1, 0, 0]) == 2 * 9 - 1


def test_missing_slice_is_interpolated_and_flagged() -> None:
    result = assemble([_slice(z) for z in (0.0, 1.0, 2.0, 4.0, 5.0, 6.0)], "FLAIR")
    assert result.volume.data.shape[0] == 7 and "missing_slices" in result.flags
    assert result.sources == (0, 1, 2, None, 3, 4, 5)
    assert float(result.volume.data[3, 0, 0]) == pytest.approx((39 + 79) / 2)


def test_a_gap_that_is_not_a_whole_number_of_steps_is_irregular() -> None:
    """20 slices 3 mm apart, then a gap of 20.1 mm (6.7 steps), then 5 more: each of the 7 steps is
    within 5 % of 3 mm, but filling the gap with 6 slices would shift every slice after it by 0.9 mm."""
    zs = [3.0 * i for i in range(20)] + [57.0 + 20.1 + 3.0 * i for i in range(5)]
    with pytest.raises(Rejected, match="irregular"):
        assemble([_slice(z) for z in zs], "FLAIR")
    on_grid = [3.0 * i for i in range(20)] + [57.0 + 21.0 + 3.0 * i for i in range(5)]
    assert "missing_slices" in assemble([_slice(z) for z in on_grid], "FLAIR").flags


def test_too_many_missing_slices_rejected() -> None:
    with pytest.raises(Rejected, match="missing"):
        assemble([_slice(z) for z in (0.0, 1.0, 5.0, 9.0)], "FLAIR")


def test_gantry_tilt_gives_a_sheared_affine() -> None:
    result = assemble([_slice(float(k), x=0.2 * k) for k in range(5)], "FLAIR")
    assert "gantry_tilt" in result.flags
    np.testing.assert_allclose(result.volume.affine_lps[:3, 2], [0.2, 0.0, 1.0])


def test_localiser_of_another_orientation_is_dropped() -> None:
    sag = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    result = assemble([_slice(float(k)) for k in range(4)] + [_slice(0.0, iop=sag)], "FLAIR")
    assert result.volume.data.shape[0] == 4 and "mixed_orientation" in result.flags


def test_rle_compressed_pixels_decode() -> None:
    vol = assemble([_slice(float(k), rle=True) for k in range(3)], "QSM").volume
    assert float(vol.data[2, 0, 0]) == 39.0


def _enhanced(values: list[int], positions: list[float]) -> Dataset:
    """An Enhanced MR-like instance: one frame per value, geometry only in the functional groups."""
    ds = _slice(0.0)
    frames = np.stack([np.full((8, 8), v, np.uint16) for v in values])
    ds.NumberOfFrames = len(values)
    ds.PixelData = frames.tobytes()
    del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, ds.RescaleSlope, ds.RescaleIntercept
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = IOP
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = [1.0, 1.0]
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for z in positions:
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, z]
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return dcmread(io.BytesIO(buf.getvalue()), force=True)


def test_enhanced_multiframe() -> None:
    assembly = assemble([_enhanced([20, 0, 10], [2.0, 0.0, 1.0])], "FLAIR")
    assert [float(assembly.volume.data[k, 0, 0]) for k in range(3)] == [0.0, 10.0, 20.0]
    assert assembly.sources == (0, 0, 0) and assembly.frames == (1, 2, 0)  # slice k -> its frame


def test_enhanced_instances_of_one_frame_each() -> None:
    """Some exports send a 2D series as one-frame Enhanced MR instances: no top-level geometry."""
    series = [_enhanced([10 * z], [float(z)]) for z in (2, 0, 1)]
    assembly = assemble(series, "FLAIR")
    assert [float(assembly.volume.data[k, 0, 0]) for k in range(3)] == [0.0, 10.0, 20.0]
    assert assembly.sources == (1, 2, 0) and assembly.frames == (0, 0, 0)


def test_monochrome1_is_inverted_so_lesions_stay_bright() -> None:
    """MONOCHROME1 displays the minimum as white: the same image stored either way gives one volume."""
    mono2 = [_slice(z, value=100 if z == 1.0 else 4000) for z in (0.0, 1.0, 2.0)]
    mono1 = [_slice(z, value=4095 - (100 if z == 1.0 else 4000)) for z in (0.0, 1.0, 2.0)]
    for ds in mono2 + mono1:
        ds.BitsStored, ds.HighBit = 12, 11
    for ds in mono1:
        ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_array_equal(assemble(mono1, "FLAIR").volume.data, assemble(mono2, "FLAIR").volume.data)


def test_truncated_pixel_data_names_the_series() -> None:
    bad = _slice(1.0)
    bad.PixelData = bad.PixelData[:10]
    with pytest.raises(Rejected, match="series FLAIR instance 2: pixel data cannot be decoded"):
        assemble([_slice(0.0), bad, _slice(2.0)], "FLAIR")


def test_too_few_slices_and_no_geometry() -> None:
    with pytest.raises(Rejected, match="usable slice"):
        assemble([_slice(0.0), _slice(1.0)], "FLAIR")
    no_pos = _slice(0.0)
    del no_pos.ImagePositionPatient
    with pytest.raises(Rejected, match="ImagePositionPatient"):
        assemble([no_pos, _slice(1.0), _slice(2.0)], "FLAIR")


def test_nonfinite_pixels_are_zeroed_and_flagged() -> None:
    """A float QSM export with NaN outside the brain made every probability NaN, with no flag."""
    series = [_slice(z) for z in (0.0, 1.0, 2.0)]
    pixels = np.full((8, 8), 5.0, np.float32)
    pixels[0, 0], pixels[1, 1], pixels[2, 2] = np.nan, np.inf, -np.inf
    for ds in series:
        del ds.PixelData, ds.RescaleSlope, ds.RescaleIntercept
        ds.BitsAllocated, ds.FloatPixelData = 32, pixels.tobytes()
        del ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    assembly = assemble(series, "QSM")
    assert np.isfinite(assembly.volume.data).all() and "nonfinite_pixels" in assembly.flags
    assert float(assembly.volume.data[1, 0, 0]) == 0.0 and float(assembly.volume.data[1, 3, 3]) == 5.0

