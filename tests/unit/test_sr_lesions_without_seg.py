"""The SR's per-lesion findings when no SEG goes out (``MSGATE_RESULTS__SEG=false``, or a FLAIR from several
multi-frame instances): one TID 1411 group per lesion all the same, its region an SCOORD3D POINT at the
lesion's centroid in the FLAIR frame of reference instead of a referenced segment, with the tracking id,
finding site, volume, Rim+ probability and rim status the SEG case carries."""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pcodes
from pydicom.uid import UID

from msgate.model.types import ModelResult
from msgate.results import codes
from msgate.results.identity import Identity
from msgate.results.publish import RenderOptions, render
from msgate.results.seg import build_seg
from msgate.results.sources import FlairSources, SourceSlice, sort_slices
from msgate.results.sr import build_sr
from tests.integration.pacs_peers import flair_series, model_result

SHAPE = (12, 40, 48)
NO_SEG = RenderOptions(key_images=0, parametric_map=False, seg=False)


@pytest.fixture(scope="module")
def sources() -> list[Dataset]:
    return sort_slices(flair_series(n=SHAPE[0], rows=SHAPE[1], cols=SHAPE[2], seed=3))


def _centroid_lps(sources: list[Dataset], mask: np.ndarray, label: int) -> tuple[float, float, float]:
    """The voxel centroid of ``label`` in patient coordinates, from the sources' own geometry."""
    k, r, c = np.argwhere(mask == label).mean(0)
    first, last = (np.asarray(ds.ImagePositionPatient, float) for ds in (sources[0], sources[-1]))
    iop = np.asarray(sources[0].ImageOrientationPatient, float)
    row_mm, col_mm = (float(v) for v in sources[0].PixelSpacing)
    step = (last - first) / (len(sources) - 1)
    p = first + c * col_mm * iop[:3] + r * row_mm * iop[3:] + k * step
    return float(p[0]), float(p[1]), float(p[2])


def _with_centroids(result: ModelResult, sources: list[Dataset]) -> ModelResult:
    lesions = tuple(replace(lesion, centroid_lps=_centroid_lps(sources, result.lesion_mask, lesion.label))
                    for lesion in result.lesions)
    return replace(result, lesions=lesions)


@pytest.fixture(scope="module")
def result(sources: list[Dataset]) -> ModelResult:
    return _with_centroids(model_result(SHAPE), sources)


def _sr(objects: list) -> Dataset:  # type: ignore[type-arg]
    [data] = [obj.data for obj in objects if obj.kind == "out.sr"]
    return dcmread(io.BytesIO(data))


def _check_groups(ds: Dataset, result: ModelResult, frame_uid: str, series_uid: str) -> None:
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(result.lesions)
    assert len({g.tracking_uid for g in groups}) == len(groups)
    for group, lesion in zip(groups, result.lesions, strict=True):
        assert group.tracking_identifier == f"Lesion {lesion.label}"
        assert UID(group.tracking_uid).is_valid
        assert group.referenced_segment is None
        assert group.reference_type == pcodes.DCM.VolumeSurface
        surface = group.roi
        assert surface.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert surface.frame_of_reference_uid == frame_uid
        np.testing.assert_allclose(np.reshape(surface.graphic_data, (-1, 3)), [lesion.centroid_lps], atol=1e-3)
        assert surface.source_series_for_segmentation.value == series_uid
        assert [site.value.value for site in group.finding_sites] == [codes.LOCATION[lesion.location].value]
        assert group.finding_type.value == codes.LESION.value
        values = {m.name.value: m.value for m in group.get_measurements()}
        assert values[codes.VOLUME.value] == pytest.approx(lesion.volume_ml)
        evaluations = {e.name.value: e.value.value for e in group.get_qualitative_evaluations()}
        if lesion.rim_probability is None:
            assert codes.RIM_PROBABILITY.value not in values
            assert codes.RIM_STATUS.value not in evaluations
        else:
            assert values[codes.RIM_PROBABILITY.value] == pytest.approx(lesion.rim_probability)
            assert evaluations[codes.RIM_STATUS.value] == (
                codes.PRESENT.value if lesion.rim_positive else codes.ABSENT.value)


def test_seg_off_sr_has_one_located_group_per_lesion(sources: list[Dataset], result: ModelResult) -> None:
    objects, _ = render(result, sources, options=NO_SEG)
    assert [o.kind for o in objects] == ["out.sr"]
    ds = _sr(objects)
    _check_groups(ds, result, str(sources[0].FrameOfReferenceUID), str(sources[0].SeriesInstanceUID))
    assert any(lesion.rim_positive for lesion in result.lesions)  # the case checks a Present rim status too


def test_seg_off_without_qsm_has_no_rim_status(sources: list[Dataset]) -> None:
    result = _with_centroids(model_result(SHAPE, qsm=False), sources)
    objects, _ = render(result, sources, options=NO_SEG)
    _check_groups(_sr(objects), result, str(sources[0].FrameOfReferenceUID), str(sources[0].SeriesInstanceUID))


def test_several_multiframe_flair_instances_keep_their_lesion_groups(sources: list[Dataset],
                                                                      result: ModelResult) -> None:
    """No SEG can be built on two multi-frame sources; the SR still has every lesion."""
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    halves, series_uid = [], hd.UID()
    for n, part in enumerate((sources[:6], sources[6:]), start=1):
        mf = LegacyConvertedEnhancedMRImage(legacy_datasets=part, series_instance_uid=series_uid, series_number=9,
                                            sop_instance_uid=hd.UID(), instance_number=n)
        buf = io.BytesIO()
        mf.save_as(buf, enforce_file_format=True)
        halves.append(dcmread(io.BytesIO(buf.getvalue())))
    src = FlairSources(tuple(SourceSlice(mf, f) for mf in halves for f in range(6)))
    assert build_seg(result, src, Identity.of(result), series_uid=hd.UID(), sop_uid=hd.UID()) is None
    objects, _ = render(result, src, options=RenderOptions(key_images=0, parametric_map=False))
    assert [o.kind for o in objects] == ["out.sr"]
    _check_groups(_sr(objects), result, str(halves[0].FrameOfReferenceUID), series_uid)


def test_seg_on_groups_still_reference_their_segments(sources: list[Dataset], result: ModelResult) -> None:
    objects, _ = render(result, sources, options=RenderOptions(key_images=0, parametric_map=False))
    groups = hd.sr.Comprehensive3DSR.from_dataset(_sr(objects)).content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(result.lesions)
    assert all(group.referenced_segment is not None for group in groups)
    assert all(group.reference_type == hd.sr.CodedConcept("121191", "DCM", "Referenced Segment") for group in groups)


def _value_types(items: Sequence[Dataset]) -> list[str]:
    out = []
    for item in items:
        out.append(str(item.ValueType))
        out += _value_types(item.get("ContentSequence", []))
    return out


def test_dciodvfy_reports_no_errors_on_the_seg_off_sr(sources: list[Dataset], result: ModelResult,
                                                      tmp_path: Path) -> None:
    assert shutil.which("dciodvfy"), "dicom3tools' dciodvfy is missing: run scripts/sysdeps.sh (make test does)"
    objects, _ = render(result, sources, options=NO_SEG)
    path = tmp_path / "sr.dcm"
    path.write_bytes(next(o.data for o in objects if o.kind == "out.sr"))
    assert _value_types(dcmread(path).ContentSequence).count("SCOORD3D") == len(result.lesions)
    run = subprocess.run(["dciodvfy", "-new", str(path)], check=False, capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert [line for line in output.splitlines() if line.startswith("Error")] == [], output


def test_a_lesion_the_seg_has_no_segment_for_keeps_its_group(sources: list[Dataset], result: ModelResult) -> None:
    """Lesion 3 lies on slice 9 only, which the worker interpolated: the SEG holds lesions 1 and 2, and
    lesion 3's group takes its centroid instead of a segment."""
    src = FlairSources(tuple(None if k == 9 else SourceSlice(ds) for k, ds in enumerate(sources)))
    ident = Identity.of(result)
    seg = build_seg(result, src, ident, series_uid=hd.UID(), sop_uid=hd.UID())
    assert seg is not None and sorted(seg.lesion_segment) == [1, 2]
    ds = dcmread(io.BytesIO(_encoded(build_sr(result, src, seg, ident, series_uid=hd.UID(), sop_uid=hd.UID()))))
    groups = hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Lesion 1", "Lesion 2", "Lesion 3"]
    assert [g.reference_type.value for g in groups] == ["121191", "121191", pcodes.DCM.VolumeSurface.value]
    assert [g.tracking_uid for g in groups[:2]] == [seg.lesion_tracking_uid[1], seg.lesion_tracking_uid[2]]
    np.testing.assert_allclose(np.reshape(groups[2].roi.graphic_data, (-1, 3)), [result.lesions[2].centroid_lps],
                               atol=1e-3)


def test_a_flair_without_frame_of_reference_gets_a_point_on_the_central_slice(sources: list[Dataset],
                                                                               result: ModelResult) -> None:
    bare = [copy.deepcopy(ds) for ds in sources]
    for ds in bare:
        del ds.FrameOfReferenceUID
    ident = Identity.of(result)
    ds = dcmread(io.BytesIO(_encoded(build_sr(result, bare, None, ident, series_uid=hd.UID(), sop_uid=hd.UID()))))
    groups = hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(result.lesions)
    assert {g.reference_type.value for g in groups} == {"111030"}  # Image Region
    [region] = groups[0].roi  # lesion 1: slices 2-3 (the nearer-to-centre tie goes to 2), rows 5-8, cols 6-10
    assert region.graphic_type == hd.sr.GraphicTypeValues.POINT
    np.testing.assert_allclose(region.value, [[8.5, 7.0]])
    image = region.ContentSequence[0].ReferencedSOPSequence[0]
    assert image.ReferencedSOPInstanceUID == bare[2].SOPInstanceUID
    [region3] = groups[2].roi  # lesion 3: slice 9, rows 30-32, cols 10-11
    np.testing.assert_allclose(region3.value, [[11.0, 31.5]])
    assert region3.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == bare[9].SOPInstanceUID
    assert [site.value.value for site in groups[2].finding_sites] == [codes.LOCATION["deep_wm"].value]


def _encoded(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
