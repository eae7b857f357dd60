"""SR, SEG, Parametric Map, key images and ORU rendered from one synthetic ModelResult, read back."""

from __future__ import annotations

import copy
import io
import random
import re
import tracemalloc
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom import dcmread
from pydicom.dataset import Dataset

from msgate.config import load_settings
from msgate.model.types import ModelResult
from msgate.results import codes, control_ids, heatmap, hl7_out, outbox, payload
from msgate.results.identity import Identity
from msgate.results.publish import RenderOptions, render
from msgate.results.seg import build_seg, frame_map
from msgate.results.sources import sort_slices
from msgate.results.sr import DISCLAIMER, build_sr
from tests.integration.pacs_peers import flair_series, model_result

DOCS = Path(__file__).resolve().parents[2] / "docs" / "results.md"
PATIENT_STUDY = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                 "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                 "ReferringPhysicianName", "StudyDescription")


@pytest.fixture(scope="module")
def sources() -> list[Dataset]:
    return sort_slices(flair_series(n=12, rows=40, cols=48, seed=3))


@pytest.fixture(scope="module")
def result(sources: list[Dataset]) -> ModelResult:
    return model_result((len(sources), 40, 48))


@pytest.fixture(scope="module")
def rendered(sources: list[Dataset], result: ModelResult) -> dict[str, list[Dataset]]:
    objects, _ = render(result, sources, options=RenderOptions(key_images=2))
    out: dict[str, list[Dataset]] = {}
    for obj in objects:
        out.setdefault(obj.kind, []).append(dcmread(io.BytesIO(obj.data)))
    return out


def _reread(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return dcmread(io.BytesIO(buf.getvalue()))


def _algorithm(group: Dataset) -> tuple[str, str]:
    """(Algorithm Name, Algorithm Version) of a measurement group (DCM 111001 / 111003)."""
    items = {item.ConceptNameCodeSequence[0].CodeValue: item.get("TextValue") for item in group[0].ContentSequence}
    return items["111001"], items["111003"]


def test_sort_slices_orders_along_the_normal(sources: list[Dataset]) -> None:
    z = [float(ds.ImagePositionPatient[2]) for ds in sources]
    assert z == sorted(z)


def test_sr_values_read_back_with_highdicom(rendered: dict[str, list[Dataset]], result: ModelResult) -> None:
    sr = hd.sr.Comprehensive3DSR.from_dataset(rendered["out.sr"][0])
    group = sr.content.get_image_measurement_groups()[0]
    values = {m.name.value: m.value for m in group.get_measurements()}
    assert values[codes.EDSS_ESTIMATE.value] == pytest.approx(result.edss_estimate)
    for code, p in zip(codes.EDSS_CLASS_PROBABILITY, result.edss_probabilities, strict=True):
        assert values[code.value] == pytest.approx(p)
    assert values[codes.CONFIDENCE.value] == pytest.approx(result.confidence)
    assert values[codes.UNCERTAINTY.value] == pytest.approx(result.uncertainty)
    assert values[codes.P_MS.value] == pytest.approx(result.p_ms)
    assert values[codes.LESION_COUNT.value] == len(result.lesions)
    assert values[codes.LESION_VOLUME_TOTAL.value] == pytest.approx(result.lesion_volume_ml)
    assert values[codes.RIM_COUNT.value] == result.rim_count == 1
    evaluations = {e.name.value: e.value.value for e in group.get_qualitative_evaluations()}
    assert evaluations[codes.EDSS_CLASS.value] == codes.EDSS_CLASS_VALUES[result.edss_class].value
    assert evaluations[codes.DIAGNOSIS.value] == codes.MULTIPLE_SCLEROSIS.value
    assert _algorithm(group) == (result.model_name, result.model_version)
    assert len(group.source_images) == 12


def test_sr_lesion_groups_reference_their_segments(rendered: dict[str, list[Dataset]], result: ModelResult) -> None:
    seg = rendered["out.seg"][0]
    sr = hd.sr.Comprehensive3DSR.from_dataset(rendered["out.sr"][0])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(result.lesions)
    labels = {s.SegmentNumber: s.SegmentLabel for s in seg.SegmentSequence}
    for group, lesion in zip(groups, result.lesions, strict=True):
        assert group.tracking_identifier == f"Lesion {lesion.label}"
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert labels[ref.referenced_segment_numbers[0]] == f"Lesion {lesion.label}"
        values = {m.name.value: m.value for m in group.get_measurements()}
        assert values[codes.VOLUME.value] == pytest.approx(lesion.volume_ml)
        assert values[codes.RIM_PROBABILITY.value] == pytest.approx(lesion.rim_probability)
        rim = {e.name.value: e.value.value for e in group.get_qualitative_evaluations()}[codes.RIM_STATUS.value]
        assert rim == (codes.PRESENT.value if lesion.rim_positive else codes.ABSENT.value)
        assert _algorithm(group) == (result.model_name, result.model_version)


def test_sr_flags_observer_and_disclaimer(rendered: dict[str, list[Dataset]], result: ModelResult) -> None:
    ds = rendered["out.sr"][0]
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.CompletionFlag == "COMPLETE"
    assert ds.PreliminaryFlag == "PRELIMINARY"
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99MSGATE"
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    procedure = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "24590-2"
    context = {i.ConceptNameCodeSequence[0].CodeMeaning: i.get("TextValue") or i.get("UID")
               for i in ds.ContentSequence if i.RelationshipType == "HAS OBS CONTEXT"}
    assert context["Device Observer Name"] == "msgate"
    assert context["Device Observer Model Name"] == f"{result.model_name} {result.model_version}"
    assert len(sr.content.get_observer_contexts()) == 1
    texts = [i.TextValue for i in ds.ContentSequence if i.ValueType == "TEXT" and i.RelationshipType == "CONTAINS"]
    assert texts == [DISCLAIMER]


def test_sr_without_qsm_is_partial_and_has_no_rim_count(sources: list[Dataset]) -> None:
    result = model_result((len(sources), 40, 48), qsm=False)
    ident = Identity.of(result)
    seg = build_seg(result, sources, ident, series_uid=hd.UID(), sop_uid=hd.UID())
    assert seg is not None and sorted(seg.lesion_segment) == [lesion.label for lesion in result.lesions]
    types = {s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.dataset.SegmentSequence}
    assert types == {codes.LESION.value}  # no QSM: no lesion is Rim+
    ds = _reread(build_sr(result, sources, seg, ident, series_uid=hd.UID(), sop_uid=hd.UID()))
    assert ds.CompletionFlag == "PARTIAL"
    group = hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups()[0]
    assert codes.RIM_COUNT.value not in {m.name.value for m in group.get_measurements()}


def test_sr_goes_into_the_original_study_with_modules_copied(rendered: dict[str, list[Dataset]],
                                                             sources: list[Dataset]) -> None:
    for kind, items in rendered.items():
        for ds in items:
            for keyword in PATIENT_STUDY:
                assert ds.get(keyword) == sources[0].get(keyword), (kind, keyword)
            assert ds.SeriesInstanceUID != sources[0].SeriesInstanceUID
    series = {items[0].SeriesInstanceUID for items in rendered.values()}
    assert len(series) == len(rendered)


def test_superseding_sr_names_its_predecessor(sources: list[Dataset], result: ModelResult,
                                              rendered: dict[str, list[Dataset]]) -> None:
    old = rendered["out.sr"][0]
    objects, sr_uid = render(result, sources, options=RenderOptions(key_images=0, parametric_map=False),
                             previous=[old])
    new = dcmread(io.BytesIO(objects[-1].data))
    assert new.SOPInstanceUID == sr_uid != old.SOPInstanceUID
    ref = new.PredecessorDocumentsSequence[0]
    assert ref.StudyInstanceUID == old.StudyInstanceUID
    assert ref.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.SOPInstanceUID


def test_seg_geometry_round_trip(rendered: dict[str, list[Dataset]], sources: list[Dataset],
                                 result: ModelResult) -> None:
    """Every SEG frame lies on its source slice (same position, orientation, spacing) and equals the mask."""
    seg = hd.seg.Segmentation.from_dataset(rendered["out.seg"][0])
    assert seg.SegmentationType == "BINARY"
    k_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(sources)}
    label_of = {int(s.SegmentNumber): int(str(s.SegmentLabel).removeprefix("Lesion ")) for s in seg.SegmentSequence}
    masks = {number: result.lesion_mask == label for number, label in label_of.items()}
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [1.25, 1.0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    frames = frame_map(seg)
    nonempty = sum(int(mask.any(axis=(1, 2)).sum()) for mask in masks.values())
    assert seg.NumberOfFrames == len(frames) == nonempty  # empty frames omitted
    pixels = seg.pixel_array.reshape(seg.NumberOfFrames, seg.Rows, seg.Columns)
    for (number, sop_uid, _frame), n in frames.items():
        k = k_of[sop_uid]
        frame = seg.PerFrameFunctionalGroupsSequence[n - 1]
        ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert ipp == [float(v) for v in sources[k].ImagePositionPatient]
        np.testing.assert_array_equal(pixels[n - 1].astype(bool), masks[number][k])
    volume = seg.get_volume()
    assert volume is not None
    for label in {int(v) for v in np.unique(result.lesion_mask)} - {0}:
        k, r, c = (int(v[0]) for v in np.nonzero(result.lesion_mask == label))
        lps = np.asarray(sources[k].ImagePositionPatient, dtype=float) + np.array([c * 1.0, r * 1.25, 0.0])
        ijk = np.linalg.inv(volume.affine) @ np.append(lps, 1.0)
        number = next(n for n, mask in masks.items() if mask[k, r, c])
        assert volume.array[tuple(int(round(x)) for x in ijk[:3])][number - 1]


def test_parametric_map_values_match_the_heatmap(rendered: dict[str, list[Dataset]], sources: list[Dataset],
                                                 result: ModelResult) -> None:
    pm = rendered["out.pm"][0]
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert pm.NumberOfFrames == len(sources)
    k_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(sources)}
    pixels = pm.pixel_array
    for n, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
        k = k_of[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose(pixels[n], result.heatmap[k], atol=1e-6)  # type: ignore[index]
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "GRADCAM"


def test_key_images_are_rgb_with_banner_and_source(rendered: dict[str, list[Dataset]], sources: list[Dataset],
                                                   result: ModelResult) -> None:
    images = rendered["out.sc"]
    assert len(images) == 2
    uids = {str(ds.SOPInstanceUID) for ds in sources}
    expected = {str(sources[k].SOPInstanceUID) for k in heatmap.key_slices(result, 2)}
    assert {ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in images} == expected <= uids
    for ds in images:
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.BurnedInAnnotation == "YES" and ds.Columns >= heatmap.MIN_COLUMNS
        banner = ds.pixel_array[2, :, :]
        assert (banner[:, 0] > 120).mean() > 0.5 and (banner[:, 1] < 60).mean() > 0.5  # red strip


def test_key_images_can_be_switched_off(sources: list[Dataset], result: ModelResult) -> None:
    objects, _ = render(result, sources, options=RenderOptions(key_images=0, parametric_map=False))
    assert [o.kind for o in objects] == ["out.seg", "out.sr"]


def test_empty_mask_gives_no_seg_and_no_lesion_groups(sources: list[Dataset], result: ModelResult) -> None:
    empty = ModelResult(**{**result.__dict__, "lesions": (), "lesion_mask": np.zeros_like(result.lesion_mask)})
    objects, _ = render(empty, sources, options=RenderOptions(key_images=1))
    assert [o.kind for o in objects] == ["out.pm", "out.sc", "out.sr"]
    sr = hd.sr.Comprehensive3DSR.from_dataset(dcmread(io.BytesIO(objects[-1].data)))
    assert sr.content.get_volumetric_roi_measurement_groups() == []


def test_grid_mismatch_is_refused(sources: list[Dataset]) -> None:
    wrong = model_result((len(sources), 40, 40))
    with pytest.raises(ValueError, match="FLAIR grid"):
        render(wrong, sources)


def _oru(result: ModelResult, source: Dataset, correction: bool) -> str:
    settings = load_settings(home=Path("/nonexistent"), hl7_out={"host": "127.0.0.1", "port": 2576})
    numbers = hl7_out.OrderNumbers("PL123", "FI456", "ACC-R-1")
    return hl7_out.render_oru(result, source=source, numbers=numbers, sr_uid="1.2.3.4", correction=correction,
                              settings=settings)


def test_oru_carries_findings_uids_and_order_numbers(sources: list[Dataset], result: ModelResult) -> None:
    er7 = hl7_out.with_control_id(_oru(result, sources[0], False).encode(), "MGabc0001").decode()
    msg = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    msg.validate()
    assert msg.msh.msh_10.value == "MGabc0001"
    segments = {line[:3]: line.split("|") for line in er7.split("\r") if line}
    obr = segments["OBR"]
    assert (obr[2], obr[3], obr[18], obr[25]) == ("PL123", "FI456", "ACC-R-1", "P")
    obx = [line.split("|") for line in er7.split("\r") if line.startswith("OBX")]
    values = {o[3].split("^")[0]: o[5] for o in obx}
    assert values["SR-UID"] == "1.2.3.4"
    assert float(values[codes.P_MS.value]) == pytest.approx(result.p_ms)
    assert values[codes.EDSS_CLASS.value].startswith(codes.EDSS_CLASS_VALUES[result.edss_class].value + "^")
    assert values[codes.DIAGNOSIS.value].startswith("24700007^")
    assert int(values[codes.RIM_COUNT.value]) == result.rim_count
    assert all(o[11] == "P" for o in obx)
    assert len(obx) == len(hl7_out.findings(result)) + 1


def test_oru_wire_format_authority_and_units(sources: list[Dataset], result: ModelResult) -> None:
    """Every segment ends with CR, the last included; UCUM units are CE with their coding system; an
    Issuer of Patient ID that does not fit HD.1 (an OID, a long name) goes into HD.2 instead of making
    the whole ORU invalid (the SR and images were held back with it)."""
    er7 = _oru(result, sources[0], False)
    assert er7.endswith("\r") and not er7.endswith("\r\r")
    units = {o.split("|")[3].split("^")[0]: o.split("|")[6] for o in er7.split("\r") if o.startswith("OBX")}
    assert units[codes.LESION_VOLUME_TOTAL.value] == "mL^mL^UCUM"
    for issuer, authority in (("2.16.840.1.113883.2.9", "&2.16.840.1.113883.2.9&ISO"),
                       ("OSPEDALE SAN MARTINO GENOVA", "&OSPEDALE SAN MARTINO GENOVA&L"), ("HOSP", "HOSP")):
        source = copy.deepcopy(sources[0])
        source.IssuerOfPatientID = issuer
        er7 = _oru(result, source, False)
        msg = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        msg.validate()
        assert _segment(er7, "PID")[3] == f"{source.PatientID}^^^{authority}^MR"
    source = copy.deepcopy(sources[0])
    source.IssuerOfPatientID = "HOSP"
    qualifier = Dataset()
    qualifier.UniversalEntityID, qualifier.UniversalEntityIDType = "1.2.250.1.71", "ISO"
    source.IssuerOfPatientIDQualifiersSequence = [qualifier]
    assert _segment(_oru(result, source, False), "PID")[3] == f"{source.PatientID}^^^HOSP&1.2.250.1.71&ISO^MR"


def test_correction_oru_stays_preliminary_and_says_so(sources: list[Dataset], result: ModelResult) -> None:
    """Unverified AI output: P even for a correction (C would mark it as a verified final result)."""
    er7 = _oru(result, sources[0], True)
    segments = er7.split("\r")
    assert all(line.split("|")[11] == "P" for line in segments if line.startswith("OBX"))
    assert next(s for s in segments if s.startswith("OBR")).split("|")[25] == "P"
    assert hl7_out.CORRECTION in [s.split("|")[3] for s in segments if s.startswith("NTE")]
    assert hl7_out.CORRECTION not in _oru(result, sources[0], False)


def test_control_id_rewrite_keeps_the_rest() -> None:
    msg = b"MSH|^~\\&|A|B|C|D|20260101||ORU^R01^ORU_R01|OLD|P|2.5.1\rPID|1\r"
    out = hl7_out.with_control_id(msg, "NEW1")
    assert out == msg.replace(b"|OLD|", b"|NEW1|")
    ids = {control_ids.control_id("0123456789abcdef0123456789abcdef", n) for n in range(1, 50)}
    assert len(ids) == 49 and all(len(i) <= 20 for i in ids)


def test_payload_round_trip(result: ModelResult) -> None:
    back = payload.load_result(payload.dump_result(result))
    assert back.lesions == result.lesions and back.flags == result.flags
    np.testing.assert_array_equal(back.lesion_mask, result.lesion_mask)
    np.testing.assert_array_equal(back.heatmap, result.heatmap)  # type: ignore[arg-type]
    assert (back.edss_probabilities, back.p_ms) == (result.edss_probabilities, result.p_ms)


def test_backoff_is_exponential_jittered_and_capped() -> None:
    policy = outbox.Policy(base_delay=5, max_delay=3600)
    rng = random.Random(1)
    for n in range(1, 20):
        cap = min(3600, 5 * 2 ** (n - 1))
        delays = [outbox.backoff(n, policy, rng) for _ in range(20)]
        assert all(cap / 2 <= d <= cap for d in delays)
    assert len({round(outbox.backoff(3, policy, rng), 6) for _ in range(10)}) > 1


def test_every_local_code_is_documented() -> None:
    text = DOCS.read_text()
    for value, scheme, meaning in codes.table():
        assert scheme == "99MSGATE"
        assert re.search(rf"\|\s*`{re.escape(value)}`\s*\|\s*{re.escape(meaning)}\s*\|", text), value


def test_key_images_setting(tmp_path: Path) -> None:
    assert RenderOptions.from_settings(load_settings(home=tmp_path)).key_images == 3
    off = load_settings(home=tmp_path, results={"key_images": 0})
    assert RenderOptions.from_settings(off) == RenderOptions(key_images=0, parametric_map=True)


def _segment(er7: str, name: str) -> list[str]:
    return next(line for line in er7.split("\r") if line.startswith(name)).split("|")


def _with(source: Dataset, **attrs: object) -> Dataset:
    import copy

    changed = copy.deepcopy(source)  # the fixture is shared by the module
    for key, value in attrs.items():
        setattr(changed, key, value)
    return changed


def test_oru_escapes_delimiters_in_identifiers_and_names(sources: list[Dataset], result: ModelResult) -> None:
    """An ``^`` in an MRN used to split it (PID-3.1 read as another patient's MRN); an ``&`` in an order
    number made the whole publish fail validation; an ``&`` in a name passed through."""
    settings = load_settings(home=Path("/nonexistent"), hl7_out={"host": "127.0.0.1", "port": 2576})
    source = _with(sources[0], PatientID="MRN^1", PatientName="Smith&Jones^Mary")
    er7 = hl7_out.render_oru(result, source=source, numbers=hl7_out.OrderNumbers("PL|1", "R&D-77", "ACC~2"),
                             sr_uid="1.2.3.4", correction=False, settings=settings)
    pid = _segment(er7, "PID")
    assert pid[3].split("^")[0] == "MRN\\S\\1" and pid[5].startswith("Smith\\T\\Jones^Mary")
    obr = _segment(er7, "OBR")
    assert (obr[2], obr[3], obr[18]) == ("PL\\F\\1", "R\\T\\D-77", "ACC\\R\\2")
    parsed = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert parsed.ORU_R01_PATIENT_RESULT.ORU_R01_PATIENT.PID.PID_3.CX_1.to_er7() == "MRN\\S\\1"


def test_oru_person_name_components_and_charset(sources: list[Dataset], result: ModelResult) -> None:
    """DICOM PN is family^given^middle^prefix^suffix (with = groups); HL7 XPN puts the suffix before the
    prefix. A non-ASCII name is sent as UTF-8, so MSH-18 says so."""
    er7 = _oru(result, _with(sources[0], SpecificCharacterSet="ISO_IR 192",
                             PatientName="Müller^Jürgen^Q^Dr^Jr=山田^太郎"), False)
    assert _segment(er7, "PID")[5] == "Müller^Jürgen^Q^Jr^Dr"
    assert _segment(er7, "MSH")[17] == "UNICODE UTF-8"
    assert len(_segment(_oru(result, sources[0], False), "MSH")) < 18  # ASCII: no MSH-18


def test_oru_times_exam_time_and_offsets(sources: list[Dataset], result: ModelResult) -> None:
    """OBR-7/OBX-14 are when the exam was done (StudyDate/StudyTime, local unless the source gives its
    offset), not the publish time; times msgate makes are UTC with +0000."""
    source = _with(sources[0], StudyDate="20261120", StudyTime="101500.25")
    er7 = _oru(result, source, False)
    assert _segment(er7, "MSH")[6].endswith("+0000") and _segment(er7, "OBR")[22].endswith("+0000")
    assert _segment(er7, "OBR")[7] == "20261120101500"
    findings = [line.split("|") for line in er7.split("\r") if line.startswith("OBX") and "SR-UID" not in line]
    assert {obx[14] for obx in findings} == {"20261120101500"}
    with_offset = _oru(result, _with(source, TimezoneOffsetFromUTC="+0100"), False)
    assert _segment(with_offset, "OBR")[7] == "20261120091500+0000"


def test_flags_reach_the_oru_and_the_sr(sources: list[Dataset], result: ModelResult) -> None:
    """A result flagged for review, or computed without QSM or an EHR value, says so in both outputs;
    the numbers alone used to be identical with and without the flag."""
    from msgate.results.notes import flag_notes

    flagged = ModelResult(**{**result.__dict__, "flags": ("review", "qsm_absent", "ehr_missing:nfl",
                                                          "flair_missing_slices", "qsm_nonfinite_pixels")})
    notes = flag_notes(flagged)
    assert len(notes) == 5 and flag_notes(ModelResult(**{**result.__dict__, "flags": ()})) == ()
    # the worker prefixes series flags with their role; they used to match no note at all
    assert "FLAIR series: missing slices, completed by interpolation." in notes
    ntes = [line.split("|")[3] for line in _oru(flagged, sources[0], False).split("\r") if line.startswith("NTE")]
    assert all(note in ntes for note in notes)
    sr = build_sr(flagged, sources, None, Identity.of(flagged), series_uid="1.2.3", sop_uid="1.2.3.1")
    texts = [item.TextValue for item in sr.ContentSequence if getattr(item, "ValueType", "") == "TEXT"]
    assert DISCLAIMER in texts and all(note in texts for note in notes)


def test_japanese_character_set_with_an_empty_first_value_renders() -> None:
    """``\\ISO 2022 IR 87`` (PS3.5 H.3.1, the usual Japanese form) made highdicom refuse the sources and the
    whole publish fail without a retry; every object now carries the name as received."""
    from tests.integration.pacs_peers import encode

    sources = []
    for ds in flair_series(n=12, rows=40, cols=48, seed=3):
        ds.SpecificCharacterSet, ds.PatientName = ["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"
        sources.append(dcmread(io.BytesIO(encode(ds))))
    objects, _ = render(model_result((12, 40, 48)), sort_slices(sources), options=RenderOptions(key_images=1))
    assert len(objects) >= 3
    for obj in objects:
        out = dcmread(io.BytesIO(obj.data))
        assert str(out.PatientName) == "Yamada^Tarou=山田^太郎"
        assert list(out.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 87"]


def test_key_slices_are_the_most_salient_ones() -> None:
    """Literal answers (the key-image test derives its expectation from key_slices itself)."""
    mask = np.zeros((8, 4, 4), np.int16)
    mask[2, :2, :2] = 1  # 4 lesion voxels on slice 2
    heat = np.zeros((8, 4, 4), np.float32)
    heat[6] = 0.5  # 8.0 of heatmap mass on slice 6
    heat[4] = 0.1  # 1.6 on slice 4
    result = ModelResult(**{**model_result((12, 40, 48)).__dict__, "lesion_mask": mask, "heatmap": heat})
    assert heatmap.key_slices(result, 2) == [2, 6]  # slice order, not rank order
    assert heatmap.key_slices(result, 1) == [6]
    assert heatmap.key_slices(result, 5) == [2, 4, 6]  # slices with nothing are never key images
    assert heatmap.key_slices(result, 2, among=[0, 1, 2, 3, 4, 5, 7]) == [2, 4]  # slice 6 has no source


def test_source_values_in_the_forms_routers_send_do_not_stop_the_results(result: ModelResult) -> None:
    """A birth date with dashes, a lower-case sex, a time with colons: highdicom refuses to copy them and
    the whole publish failed, for good. They go out in their DICOM form, or empty (Type 2)."""
    sources = sort_slices(flair_series(n=12, rows=40, cols=48, seed=3))
    for ds in sources:
        ds.PatientBirthDate, ds.PatientSex, ds.StudyTime, ds.StudyDate = "1953-03-17", "f", "10:15:00", "2026-11-20"
    sources[0].PatientBirthDate = sources[1].PatientBirthDate = "1953"  # not a date at all
    objects, _ = render(result, sources, options=RenderOptions(key_images=1))
    sr = dcmread(io.BytesIO(next(o.data for o in objects if o.kind == "out.sr")))
    assert (sr.PatientSex, sr.StudyTime, sr.StudyDate) == ("F", "101500", "20261120")
    assert sr.PatientBirthDate in ("", "19530317")
    assert {o.kind for o in objects} >= {"out.sr", "out.seg", "out.pm", "out.sc"}


VOXEL_ML = 1.25 * 1.0 * 3.0 / 1000  # flair_series: Pixel Spacing 1.25 x 1.0 mm, slices 3 mm apart


def _segment_voxels(seg: Dataset) -> dict[int, int]:
    """Voxels per segment number, counted in the SEG's own pixel data by its per-frame segment numbers."""
    pixels = seg.pixel_array.reshape(seg.NumberOfFrames, seg.Rows, seg.Columns)
    out: dict[int, int] = {}
    for (number, _uid, _frame), n in frame_map(seg).items():
        out[number] = out.get(number, 0) + int(pixels[n - 1].astype(bool).sum())
    return out


def test_each_lesion_group_references_exactly_its_lesion(rendered: dict[str, list[Dataset]],
                                                          result: ModelResult) -> None:
    """TID 1411: the referenced segment is the region measured. Lesions 1 and 3 both referenced the whole
    "MS lesion" class segment (0.1725 mL, against 0.15 and 0.0225 mL reported)."""
    seg = rendered["out.seg"][0]
    sr = hd.sr.Comprehensive3DSR.from_dataset(rendered["out.sr"][0])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    numbers = [group.referenced_segment.referenced_segment_numbers[0] for group in groups]
    assert len(set(numbers)) == len(numbers) == len(result.lesions)
    voxels = _segment_voxels(seg)
    for group, number, lesion in zip(groups, numbers, result.lesions, strict=True):
        segment = seg.SegmentSequence[number - 1]
        assert segment.SegmentNumber == number
        assert segment.SegmentLabel == segment.TrackingID == group.tracking_identifier == f"Lesion {lesion.label}"
        assert segment.TrackingUID == group.tracking_uid
        expected = codes.RIM_LESION if lesion.rim_positive else codes.LESION
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == expected.value
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes.ABNORMAL_STRUCTURE.value
        volume = {m.name.value: m.value for m in group.get_measurements()}[codes.VOLUME.value]
        assert voxels[number] * VOXEL_ML == pytest.approx(volume)
        assert voxels[number] == int((result.lesion_mask == lesion.label).sum())


def test_mask_labels_without_a_finding_go_into_one_remainder_segment(sources: list[Dataset],
                                                                     result: ModelResult) -> None:
    """Voxels no finding describes (a payload whose lesion list left one out) stay in the SEG, in one
    segment no SR group references, instead of disappearing or joining a lesion's segment."""
    partial = ModelResult(**{**result.__dict__, "lesions": result.lesions[:2]})
    ident = Identity.of(partial)
    seg = build_seg(partial, sources, ident, series_uid=hd.UID(), sop_uid=hd.UID())
    assert seg is not None
    labels = [str(s.SegmentLabel) for s in seg.dataset.SegmentSequence]
    assert labels == ["Lesion 1", "Lesion 2", "MS lesion, other"]
    assert _segment_voxels(_reread(seg.dataset))[3] == int((result.lesion_mask == 3).sum())
    ds = _reread(build_sr(partial, sources, seg, ident, series_uid=hd.UID(), sop_uid=hd.UID()))
    groups = hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_volumetric_roi_measurement_groups()
    assert [g.referenced_segment.referenced_segment_numbers[0] for g in groups] == [1, 2]


def _many_lesions(shape: tuple[int, int, int], n: int) -> ModelResult:
    """``n`` lesions of 2 x 2 x 2 voxels on distinct (slice, row) places; every fifth one Rim+."""
    mask = np.zeros(shape, np.int16)
    base = model_result(shape)
    lesions = []
    for i in range(n):
        k, r, c = 1 + 3 * (i % 6), 2 + 6 * (i // 6), 5 + (7 * i) % 60
        mask[k:k + 2, r:r + 2, c:c + 2] = i + 1
        lesions.append(replace(base.lesions[0], label=i + 1, volume_ml=8 * VOXEL_ML,
                               rim_probability=0.9 if i % 5 == 0 else 0.1))
    return ModelResult(**{**base.__dict__, "lesions": tuple(lesions), "lesion_mask": mask})


def test_sixty_small_lesions_get_sixty_segments_in_bounded_memory() -> None:
    """One segment per lesion, built from a label map: memory stays near the volume's size (a one-hot
    stack would be 60 volumes) and only the lesions' own planes become frames."""
    shape = (20, 64, 80)
    sources = sort_slices(flair_series(n=shape[0], rows=shape[1], cols=shape[2], seed=11))
    many = _many_lesions(shape, 60)
    build_seg(many, sources, Identity.of(many), series_uid=hd.UID(), sop_uid=hd.UID())  # first use loads tables
    tracemalloc.start()
    try:
        seg = build_seg(many, sources, Identity.of(many), series_uid=hd.UID(), sop_uid=hd.UID())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seg is not None
    assert [str(s.SegmentLabel) for s in seg.dataset.SegmentSequence] == [f"Lesion {i}" for i in range(1, 61)]
    assert seg.dataset.NumberOfFrames == 60 * 2
    assert peak < 40 * many.lesion_mask.size, peak  # about 17 bytes a voxel; a 60-segment one-hot stack: 123
    data = _reread(seg.dataset)
    assert len(data.PixelData) == -(-60 * 2 * shape[1] * shape[2] // 8)  # bit-packed, empty frames omitted
    voxels = _segment_voxels(data)
    assert voxels == {n: 8 for n in range(1, 61)}
    rim = {int(s.SegmentNumber) for s in data.SegmentSequence
           if s.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.RIM_LESION.value}
    assert rim == {i + 1 for i in range(0, 60, 5)}


def test_a_flair_from_two_multiframe_instances_still_gets_no_seg(sources: list[Dataset],
                                                                 result: ModelResult) -> None:
    """One SEG takes one multi-frame source (PS3.3 C.8.20.2): over two, no SEG (the SR's lesion
    groups point at each lesion's centroid), rather than a SEG on the wrong frames."""
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    from msgate.results.sources import FlairSources, SourceSlice

    halves = [_reread(LegacyConvertedEnhancedMRImage(legacy_datasets=part, series_instance_uid=hd.UID(),
                                                     series_number=9, sop_instance_uid=hd.UID(), instance_number=n))
              for n, part in enumerate((sources[:6], sources[6:]), start=1)]
    src = FlairSources(tuple(SourceSlice(mf, f) for mf in halves for f in range(6)))
    assert build_seg(result, src, Identity.of(result), series_uid=hd.UID(), sop_uid=hd.UID()) is None
    objects, _ = render(result, src, options=RenderOptions(key_images=0, parametric_map=False))
    assert [o.kind for o in objects] == ["out.sr"]


def test_a_pacs_without_seg_or_parametric_map_storage_can_be_spared_them(sources: list[Dataset],
                                                                        result: ModelResult) -> None:
    """A PACS that does not take Segmentation or Parametric Map storage dead-lettered both objects of every
    study (status degraded for good, the study never purgeable), and MSGATE_RESULTS__PARAMETRIC_MAP was
    refused as an unknown setting. Both are settings now; the SR then carries the findings alone."""
    settings = load_settings(home=Path("/nonexistent"), results={"seg": False, "parametric_map": False})
    options = RenderOptions.from_settings(settings)
    assert (options.seg, options.parametric_map) == (False, False)
    objects, _ = render(result, sources, options=replace(options, key_images=1))
    assert sorted(obj.kind for obj in objects) == ["out.sc", "out.sr"]
