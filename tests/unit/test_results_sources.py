"""The derived objects land on the source planes the worker computed from: an Enhanced MR multi-frame
FLAIR (frames referenced by number, in whatever order the frames are stored), and a single-frame FLAIR
with a slice the worker interpolated (no source image, so no SEG frame and no key image there)."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pytest
from highdicom.legacy import LegacyConvertedEnhancedMRImage
from pydicom import dcmread
from pydicom.dataset import Dataset

from msgate.results.publish import RenderOptions, render
from msgate.results.seg import frame_map
from msgate.results.sources import FlairSources, SourceSlice, sort_slices
from msgate.workers import volume
from tests.integration.pacs_peers import flair_series, model_result

N, ROWS, COLS = 12, 40, 48


def _reread(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return dcmread(io.BytesIO(buf.getvalue()))


def _rendered(result: object, src: FlairSources, key_images: int) -> dict[str, list[Dataset]]:
    objects, _ = render(result, src, options=RenderOptions(key_images=key_images))  # type: ignore[arg-type]
    out: dict[str, list[Dataset]] = {}
    for obj in objects:
        out.setdefault(obj.kind, []).append(dcmread(io.BytesIO(obj.data)))
    return out


@pytest.fixture(scope="module")
def enhanced() -> tuple[Dataset, list[Dataset]]:
    """One Legacy Converted Enhanced MR image made from a shuffled 12-slice series, and the sorted slices."""
    slices = flair_series(n=N, rows=ROWS, cols=COLS, seed=5)  # shuffled: frames are not in slice order
    mf = LegacyConvertedEnhancedMRImage(legacy_datasets=slices, series_instance_uid=hd.UID(), series_number=9,
                                        sop_instance_uid=hd.UID(), instance_number=1)
    return _reread(mf), sort_slices(slices)


def test_multiframe_flair_objects_reference_the_frames_the_worker_used(enhanced: tuple[Dataset, list[Dataset]]) -> None:
    mf, ordered = enhanced
    assembly = volume.assemble([mf], "FLAIR")
    assert assembly.volume.data.shape == (N, ROWS, COLS) and assembly.sources == (0,) * N
    src = FlairSources(tuple(SourceSlice(mf, f) for f in assembly.frames))
    frame_of_k = [int(f) + 1 for f in assembly.frames]  # type: ignore[arg-type]
    assert sorted(frame_of_k) == list(range(1, N + 1)) and frame_of_k != sorted(frame_of_k)
    for k, plane in enumerate(src.slices):  # the worker's slice k is the k-th slice along the normal
        assert plane is not None and plane.position == [float(v) for v in ordered[k].ImagePositionPatient]
    result = model_result((N, ROWS, COLS))
    out = _rendered(result, src, key_images=2)

    seg = out["out.seg"][0]
    label_of = {int(s.SegmentNumber): int(str(s.SegmentLabel).removeprefix("Lesion ")) for s in seg.SegmentSequence}
    pixels = seg.pixel_array.reshape(seg.NumberOfFrames, seg.Rows, seg.Columns)
    frames = frame_map(seg)
    assert frames and all(uid == str(mf.SOPInstanceUID) and number is not None for _, uid, number in frames)
    for (segment, _, number), n in frames.items():
        k = frame_of_k.index(number)
        ipp = [float(v) for v in seg.PerFrameFunctionalGroupsSequence[n - 1].PlanePositionSequence[0].ImagePositionPatient]
        assert ipp == [float(v) for v in ordered[k].ImagePositionPatient]
        np.testing.assert_array_equal(pixels[n - 1].astype(bool), result.lesion_mask[k] == label_of[segment])

    pm = out["out.pm"][0]
    assert pm.NumberOfFrames == N
    for n, frame in enumerate(pm.PerFrameFunctionalGroupsSequence, start=1):
        number = int(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        np.testing.assert_allclose(pm.pixel_array[n - 1], result.heatmap[frame_of_k.index(number)], atol=1e-6)

    for sc in out["out.sc"]:
        ref = sc.SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == mf.SOPInstanceUID and 1 <= int(ref.ReferencedFrameNumber) <= N
        assert sc.PatientID == mf.PatientID
        np.testing.assert_allclose([float(v) for v in sc.PixelSpacing], [1.25 / 11, 1.0 / 11], rtol=1e-6)
    sr = out["out.sr"][0]
    evidence = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                for s in sr.CurrentRequestedProcedureEvidenceSequence for i in s.ReferencedSeriesSequence]
    assert str(mf.SOPInstanceUID) in {str(u) for u in evidence}


def test_an_interpolated_slice_gets_no_seg_frame_and_no_key_image() -> None:
    ordered = sort_slices(flair_series(n=N, rows=ROWS, cols=COLS, seed=7))
    gap = 6  # the heatmap's peak and lesion 2 are on this slice
    kept = [ds for k, ds in enumerate(ordered) if k != gap]
    assembly = volume.assemble(kept, "FLAIR")
    assert "missing_slices" in assembly.flags and assembly.sources[gap] is None and len(assembly.sources) == N
    src = FlairSources(tuple(None if i is None else SourceSlice(kept[i]) for i in assembly.sources))
    result = model_result((N, ROWS, COLS))
    out = _rendered(result, src, key_images=N)

    seg = out["out.seg"][0]
    used = {uid for _, uid, _ in frame_map(seg)}
    assert str(ordered[gap].SOPInstanceUID) not in used
    assert used <= {str(ds.SOPInstanceUID) for ds in kept}
    planes = result.lesion_mask[[k for k in range(N) if k != gap]]
    expected = sum(int((planes == lesion.label).any(axis=(1, 2)).sum()) for lesion in result.lesions)
    assert seg.NumberOfFrames == expected
    assert out["out.pm"][0].NumberOfFrames == N - 1
    refs = {str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) for sc in out["out.sc"]}
    assert refs and str(ordered[gap].SOPInstanceUID) not in refs


def test_a_multiframe_flair_with_a_frame_left_out_gets_no_seg_but_its_report(enhanced: tuple[Dataset, list[Dataset]]
                                                                              ) -> None:
    """A localiser frame inside the Enhanced MR instance: the worker leaves it out, and highdicom refuses a
    SEG over that instance (mixed orientations). Publishing failed outright; now the SEG and map are left
    out and the SR and key images still go out."""
    mf, _ = enhanced
    assembly = volume.assemble([mf], "FLAIR")
    used = FlairSources(tuple(SourceSlice(mf, f) for f in assembly.frames[1:]))  # frame of slice 0 left out
    result = model_result((N - 1, ROWS, COLS))
    kinds = sorted(k for k in _rendered(result, used, key_images=2))
    assert kinds == ["out.sc", "out.sr"]


def test_a_job_recorded_before_frame_mapping_is_refused_on_a_multiframe_flair(tmp_path: object) -> None:
    """Without flair_frames every slice pointed at the whole multi-frame instance: the SEG copied one mask
    slice onto every frame, silently wrong. Such a job is refused (re-run it) instead."""
    from types import SimpleNamespace

    from msgate.errors import Rejected
    from msgate.results import sources as sources_mod

    mf = _reread(LegacyConvertedEnhancedMRImage(legacy_datasets=flair_series(n=4, rows=8, cols=8, seed=2),
                                                series_instance_uid=hd.UID(), series_number=9,
                                                sop_instance_uid=hd.UID(), instance_number=1))
    buf = io.BytesIO()
    mf.save_as(buf, enforce_file_format=True)

    class _Blobs:
        def read(self, session: object, blob_id: str) -> bytes:
            return buf.getvalue()

    class _Session:
        def __enter__(self) -> _Session:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def exec(self, query: object) -> SimpleNamespace:
            return SimpleNamespace(all=lambda: [SimpleNamespace(id=7, blob_id="b")])

    store = SimpleNamespace(blobs=_Blobs(), db=SimpleNamespace(session=lambda: _Session()))
    job = SimpleNamespace(flags={"flair_instances": [7, 7, 7, 7]}, study_id=1)
    with pytest.raises(Rejected, match="re-run"):
        sources_mod.load_sources(store, job)  # type: ignore[arg-type]

