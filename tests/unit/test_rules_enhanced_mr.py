"""Series roles for Enhanced MR and Legacy Converted Enhanced MR headers.

An Enhanced MR object has no top-level InversionTime or ScanningSequence: the inversion is in the MR
Modifier Sequence of the functional groups (InversionRecovery, InversionTimes), and a Legacy Converted one
keeps the classic attributes in the Unassigned Shared / Per-Frame Converted Attributes Sequences. Reading the
top level only, a Siemens 3D FLAIR sent as Enhanced MR ("t2_spc_da-fl_sag_p2_iso") was ``T2 by name``: the
study ended stable without a FLAIR and never ran."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from msgate.listener.rules import ListenerRules, Role, classify, decide, series_fields

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_CONVERTED_MR = "1.2.840.10008.5.1.4.1.1.4.4"


def _role(ds: Dataset) -> str:
    return classify(series_fields(ds), ListenerRules().roles)[0].value


def _enhanced(description: str, *, times: list[float] | None = None, recovery: str | None = "YES",
              echo: str | None = "SPIN", per_frame: bool = False) -> Dataset:
    """A true Enhanced MR header: EchoPulseSequence at the top level, the inversion in the MR Modifier
    Sequence of the shared (or the first per-frame) functional group."""
    ds = Dataset()
    ds.SOPClassUID, ds.Modality = ENHANCED_MR, "MR"
    ds.SeriesDescription = description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    if echo is not None:
        ds.EchoPulseSequence = echo
    modifier = Dataset()
    if recovery is not None:
        modifier.InversionRecovery = recovery
    if times is not None:
        modifier.InversionTimes = times
    group = Dataset()
    group.MRModifierSequence = [modifier]
    if per_frame:
        ds.SharedFunctionalGroupsSequence = [Dataset()]
        ds.PerFrameFunctionalGroupsSequence = [group, Dataset()]
    else:
        ds.SharedFunctionalGroupsSequence = [group]
    return ds


def _legacy_converted(description: str, *, ti: float | None, scanning: list[str], per_frame: bool = False) -> Dataset:
    """A Legacy Converted Enhanced MR header: the classic attributes in the Unassigned Converted Attributes."""
    ds = Dataset()
    ds.SOPClassUID, ds.Modality = LEGACY_CONVERTED_MR, "MR"
    ds.SeriesDescription = description
    converted = Dataset()
    converted.ScanningSequence, converted.SequenceName = scanning, "*tir3d1_16"
    if ti is not None:
        converted.InversionTime = ti
    group = Dataset()
    if per_frame:
        group.UnassignedPerFrameConvertedAttributesSequence = [converted]
        ds.SharedFunctionalGroupsSequence = [Dataset()]
        ds.PerFrameFunctionalGroupsSequence = [group]
    else:
        group.UnassignedSharedConvertedAttributesSequence = [converted]
        ds.SharedFunctionalGroupsSequence = [group]
    return ds


@pytest.fixture(scope="module")
def e8_enhanced(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The product review's e8 dataset: msgate's own synthetic 3D FLAIR, named as Siemens names it, through
    the synth's Enhanced writer (highdicom Legacy Converted Enhanced MR)."""
    from pydicom.uid import ExplicitVRLittleEndian

    from msgate.model.synth import cohort, dicom_writer

    out = tmp_path_factory.mktemp("e8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            sub = cohort.simulate_subject(cohort.CohortConfig(out, seed=7, protocol="3d", resolution=2), 0)
            index = [p.role for p in sub.plans].index("FLAIR")
            se = dicom_writer.SeriesInfo(dicom_writer.uid("series", 7, 0, 1), 1, "t2_spc_da-fl_sag_p2_iso",
                                         "t2_spc_da-fl_sag_p2_iso")
            slices = dicom_writer.build_slices(sub.series[index], sub.study, se)
            path = dicom_writer._write_enhanced(slices, se, Path(out), ExplicitVRLittleEndian)
        finally:
            logging.disable(logging.NOTSET)
    return dcmread(path, stop_before_pixels=True)


def test_the_review_e8_enhanced_flair_is_flair(e8_enhanced: Dataset) -> None:
    assert e8_enhanced.SOPClassUID == LEGACY_CONVERTED_MR and "InversionTime" not in e8_enhanced
    decision = decide(e8_enhanced, ListenerRules())
    assert decision.role is Role.FLAIR, decision.role_rule
    fields = series_fields(e8_enhanced)
    assert fields.inversion_time == 1800.0
    assert fields.scanning_sequence == "SE\\IR"


def test_the_e8_enhanced_flair_is_flair_by_its_inversion_alone(e8_enhanced: Dataset) -> None:
    """The name aside ("t2" only), its spin-echo IR with TI 1800 ms in the converted attributes decides."""
    e8_enhanced = e8_enhanced.copy()
    e8_enhanced.SeriesDescription = e8_enhanced.ProtocolName = "t2_spc_sag_p2_iso"
    assert classify(series_fields(e8_enhanced), ListenerRules().roles) == (
        Role.FLAIR, "long-TI inversion recovery T2")


@pytest.mark.parametrize("name", ["t2_spc_da-fl_sag_p2_iso", "t2_space_da_fl_tra", "T2 SPC DA-FL", "da-fl 3D",
                                  "t2_tirm_tra_da-fl"])
def test_siemens_dark_fluid_abbreviation_is_flair(name: str) -> None:
    ds = Dataset()
    ds.SeriesDescription = name
    assert _role(ds) == "FLAIR"  # by name, no inversion time in the header


@pytest.mark.parametrize("name", ["t1_tir_tra_da-fl", "t1_spc_da_fl_sag"])
def test_a_t1_dark_fluid_abbreviation_is_t1(name: str) -> None:
    ds = Dataset()
    ds.SeriesDescription = name
    assert _role(ds) == "T1"


@pytest.mark.parametrize("name", ["dafly", "sag_data-flow", "panda_fl2", "soda-flush"])
def test_words_holding_da_fl_are_not_flair(name: str) -> None:
    ds = Dataset()
    ds.SeriesDescription = name
    assert _role(ds) != "FLAIR"


@pytest.mark.parametrize("per_frame", [False, True])
def test_enhanced_mr_modifier_inversion_makes_a_long_ti_spin_echo_ir_flair(per_frame: bool) -> None:
    ds = _enhanced("Sag 3D p2 iso", times=[1800.0], per_frame=per_frame)
    fields = series_fields(ds)
    assert (fields.inversion_time, fields.scanning_sequence) == (1800.0, "SE\\IR")
    assert classify(fields, ListenerRules().roles) == (Role.FLAIR, "long-TI inversion recovery T2")
    named = _enhanced("t2_spc_sag_p2_iso", times=[1800.0], per_frame=per_frame)
    assert _role(named) == "FLAIR"  # was "T2 by name"


def test_an_enhanced_t1_flair_short_ti_is_t1() -> None:
    assert _role(_enhanced("Ax FLAIR", times=[860.0])) == "T1"  # FLAIR-named, short TI


def test_inversion_recovery_no_adds_no_ir() -> None:
    ds = _enhanced("t2_spc_sag_p2_iso", times=[1800.0], recovery="NO")
    assert series_fields(ds).scanning_sequence == "SE"
    assert _role(ds) == "T2"


def test_ir_is_not_added_twice() -> None:
    ds = _enhanced("Sag 3D", times=[1800.0])
    ds.ScanningSequence = ["SE", "IR"]
    assert series_fields(ds).scanning_sequence == "SE\\IR"


def test_the_top_level_inversion_time_wins() -> None:
    ds = _enhanced("Sag 3D", times=[2500.0])
    ds.InversionTime = 900.0
    assert series_fields(ds).inversion_time == 900.0


@pytest.mark.parametrize("per_frame", [False, True])
def test_legacy_converted_attributes_give_ti_and_scanning_sequence(per_frame: bool) -> None:
    ds = _legacy_converted("t2_spc_sag_p2_iso", ti=2500.0, scanning=["SE", "IR"], per_frame=per_frame)
    fields = series_fields(ds)
    assert (fields.inversion_time, fields.scanning_sequence) == (2500.0, "SE\\IR")
    assert fields.sequence_name == "*tir3d1_16"
    assert _role(ds) == "FLAIR"
    assert _role(_legacy_converted("Sag 3D", ti=860.0, scanning=["GR", "IR"], per_frame=per_frame)) == "T1"


def test_an_enhanced_dir_stays_dir() -> None:
    assert _role(_enhanced("Sag 3D IR", times=[3000.0, 450.0])) == "DIR"
    assert _role(_enhanced("Sag 3D IR", times=[3000.0, 450.0], per_frame=True)) == "DIR"
    assert _role(_enhanced("Sag 3D IR", times=[3000.0, 450.0], echo=None)) == "DIR"
    assert _role(_enhanced("t2_spc_dir_sag_p2", times=[3000.0, 450.0])) == "DIR"


@pytest.mark.parametrize("times", [[700.0, 2500.0], [2500.0, 700.0], [2500.0]])
def test_an_enhanced_mp2rage_is_never_flair_or_dir(times: list[float]) -> None:
    """A gradient-echo IR (MP2RAGE, its INV2 image alone) is never a FLAIR, whatever its TI: a FLAIR is a
    spin echo. Now that InversionRecovery YES adds IR, a long TI would otherwise have made it one."""
    ds = _enhanced("Sag 3D IR", times=times, echo="GRADIENT")
    assert series_fields(ds).scanning_sequence == "GR\\IR"
    assert _role(ds) not in ("FLAIR", "DIR")
    if len(times) == 2:
        assert _role(ds) == "T1"
    assert _role(_enhanced("t1_mp2rage_sag_p3", times=times, echo="GRADIENT")) == "T1"


def test_a_classic_gradient_echo_ir_with_a_long_ti_is_not_flair() -> None:
    ds = Dataset()
    ds.ScanningSequence, ds.InversionTime = ["GR", "IR"], 2500.0
    assert _role(ds) != "FLAIR"


def test_empty_inversion_values_are_no_inversion_time() -> None:
    ds = _enhanced("Sag 3D", times=None)
    ds.SharedFunctionalGroupsSequence[0].MRModifierSequence[0].add_new(0x00189079, "FD", None)  # InversionTimes
    converted = Dataset()
    converted.add_new(0x00180082, "DS", None)  # InversionTime
    ds.SharedFunctionalGroupsSequence[0].UnassignedSharedConvertedAttributesSequence = [converted]
    fields = series_fields(ds)
    assert (fields.inversion_time, fields.scanning_sequence) == (None, "SE\\IR")
    assert _role(ds) == "OTHER"


def test_damaged_functional_groups_are_not_an_error() -> None:
    ds = _enhanced("Sag 3D", times=[1800.0])
    ds.SharedFunctionalGroupsSequence = []
    ds.PerFrameFunctionalGroupsSequence = [Dataset()]
    assert series_fields(ds).inversion_time is None
    ds.SharedFunctionalGroupsSequence = [Dataset()]
    ds.SharedFunctionalGroupsSequence[0].MRModifierSequence = []
    assert series_fields(ds).inversion_time is None
