"""Double inversion recovery (DIR) is its own series role, never the model's FLAIR.

A DIR (SE\\IR, first TI ~3000 ms) met the "long-TI inversion recovery T2" rule and nothing excluded
"dir" from the FLAIR rules, so a 3D DIR (more frames) won over the real 2D FLAIR of an MS protocol."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from msgate.config import load_settings
from msgate.errors import ConfigError
from msgate.listener.rules import ListenerRules, Role, classify, series_fields
from msgate.storage.models import Series
from msgate.workers.case import choose_series


def _ds(description: str, *, ti: float | None = 3000.0, scanning: tuple[str, ...] = ("SE", "IR"),
        **attrs: object) -> Dataset:
    ds = Dataset()
    if description:
        ds.SeriesDescription = description
    ds.ScanningSequence = list(scanning)
    if ti is not None:
        ds.InversionTime = ti
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _role(ds: Dataset) -> str:
    return classify(series_fields(ds), ListenerRules().roles)[0].value


@pytest.mark.parametrize("name", [
    "t2_spc_dir_sag_p2", "DIR_SPACE", "t2_spc_dir_sag_p2_iso", "3D DIR", "Sag 3D DIR CUBE", "dir_tse_sag",
    "3D_DIR_SAG", "DIR3D", "double inversion recovery", "Double_Inversion_Recovery", "double_ir", "DoubleIR",
    "dbl_ir", "DBL-IR 3D", "3D 2IR", "2IR_SAG", "sag 2-ir", "t2_space_dark-fluid_DIR",
])
def test_dir_names_are_dir(name: str) -> None:
    assert _role(_ds(name)) == "DIR"
    assert _role(_ds(name, ti=None)) == "DIR"  # by name, whatever the header says


def test_dir_in_protocol_name_only() -> None:
    assert _role(_ds("Sag 3D", ti=None, scanning=("SE",), ProtocolName="t2_spc_dir_sag_p2")) == "DIR"


@pytest.mark.parametrize(("name", "ti"), [
    ("t2_tirm_tra_dark-fluid", 2500.0), ("t2_tirm_tra_dark-fluid", None), ("FLAIR 3D", 1800.0),
    ("Ax T2 FLAIR", 2500.0), ("AX FLAIR", None), ("t2_space_dark-fluid_sag_p2_iso", 1800.0),
    ("Sag CUBE FLAIR", 1800.0), ("T2W_FLAIR", 2800.0), ("", 2500.0),
])
def test_true_flair_stays_flair(name: str, ti: float | None) -> None:
    assert _role(_ds(name, ti=ti)) == "FLAIR"


@pytest.mark.parametrize("name", [
    "AX FLAIR phase direction RL", "FLAIR dircos", "FLAIR dirty", "AX FLAIR indirect", "FLAIR_redir",
    "AX FLAIR 6 dir", "AX T2 FLAIR phase dir AP", "t2_tirm_tra_dark-fluid t2ir",
])
def test_words_with_dir_inside_are_not_dir(name: str) -> None:
    assert _role(_ds(name, ti=2500.0)) == "FLAIR"


@pytest.mark.parametrize("name", [
    "AX FLAIR dir-RL", "3D FLAIR (dir LR)", "anat-FLAIR_dir-AP", "sag_flair_dir_PA", "AX T2 FLAIR dir: R>>L",
    "Ax FLAIR PE dir A-P", "3D FLAIR dir=SI", "t2_tirm_tra_dark-fluid_dir-RL", "FLAIR DIR HF",
])
def test_a_flair_named_with_its_phase_encoding_direction_stays_flair(name: str) -> None:
    """ReproIn's ``dir-AP`` and the like name the phase-encoding direction, not a double IR: the study's
    only FLAIR was DIR and the study never ran."""
    assert _role(_ds(name, ti=2500.0)) == "FLAIR"
    assert _role(_ds(name, ti=None)) == "FLAIR"


@pytest.mark.parametrize(("name", "role"), [
    ("anat-T1w_dir-AP", "T1"), ("MPRAGE dir-RL", "T1"), ("AX T2 TSE (dir LR)", "T2"), ("anat-T2w_dir-PA", "T2"),
    ("anat-DIR_dir-AP", "DIR"), ("3D DIR dir-LR", "DIR"), ("Sag 3D dir-AP", "DIR"), ("DIR_LR", "DIR"),
])
def test_a_direction_suffix_yields_to_the_contrast_the_name_gives(name: str, role: str) -> None:
    """A ``dir`` with a direction is DIR only when the name gives no other contrast: a bare "DIR_LR" (a
    long-TI IR) would otherwise be taken for a FLAIR."""
    assert _role(_ds(name, ti=None, scanning=("SE",))) == role
    if role == "DIR":
        assert _role(_ds(name, ti=3000.0)) == "DIR"


@pytest.mark.parametrize("name", ["3D FLAIR DIR", "DIR FLAIR sag", "dark-fluid dir 3D"])
def test_a_flair_name_with_a_plain_dir_token_is_dir(name: str) -> None:
    """No direction follows: taken as a double IR. A DIR fed to the model as its FLAIR is a wrong result; a
    FLAIR taken as DIR leaves the study waiting for a FLAIR, where a site rule can name it."""
    assert _role(_ds(name, ti=2500.0)) == "DIR"


@pytest.mark.parametrize("name", ["DTI 30 dir", "ep2d_diff_64dir", "DWI 6 dir", "dti_30dir_b1000"])
def test_diffusion_directions_are_not_dir(name: str) -> None:
    assert _role(_ds(name, ti=None, scanning=("EP",))) == "OTHER"


def _enhanced(description: str, times: list[float]) -> Dataset:
    """Enhanced MR: the inversion times are in the MR Modifier Sequence of the functional groups."""
    ds = _ds(description, ti=None)
    modifier = Dataset()
    modifier.InversionRecovery, modifier.InversionTimes = "YES", times
    group = Dataset()
    group.MRModifierSequence = [modifier]
    ds.SharedFunctionalGroupsSequence = [group]
    return ds


def test_two_inversion_times_make_an_unnamed_series_dir() -> None:
    assert _role(_enhanced("Sag 3D IR", [3000.0, 450.0])) == "DIR"
    assert _role(_enhanced("Sag 3D IR", [2500.0])) != "DIR"
    per_frame = _enhanced("Sag 3D IR", [3000.0, 450.0])
    per_frame.PerFrameFunctionalGroupsSequence = per_frame.SharedFunctionalGroupsSequence
    del per_frame.SharedFunctionalGroupsSequence
    assert _role(per_frame) == "DIR"
    top = _ds("Sag 3D IR", ti=None, InversionTimes=[3000.0, 450.0])
    assert _role(top) == "DIR"


def test_an_unnamed_gradient_echo_with_two_inversion_times_is_not_dir() -> None:
    """An MP2RAGE (GR\\IR) lists two inversion times too: it is a T1 by its TI, never a DIR."""
    mp2rage = _ds("", ti=700.0, scanning=("GR", "IR"), InversionTimes=[700.0, 2500.0])
    assert _role(mp2rage) == "T1"
    assert _role(_ds("Sag 3D", ti=None, scanning=("GR", "IR"), InversionTimes=[700.0, 2500.0])) != "DIR"
    enhanced = _enhanced("Sag 3D IR", [700.0, 2500.0])
    del enhanced.ScanningSequence  # Enhanced MR: EchoPulseSequence says gradient or spin echo
    enhanced.EchoPulseSequence = "GRADIENT"
    assert series_fields(enhanced).scanning_sequence == "GR\\IR"  # InversionRecovery YES adds IR
    assert _role(enhanced) != "DIR"
    enhanced.EchoPulseSequence = "SPIN"
    assert _role(enhanced) == "DIR"
    del enhanced.EchoPulseSequence
    assert _role(enhanced) == "DIR"  # neither attribute: the inversion count decides


def test_a_named_series_is_trusted_over_its_inversion_count() -> None:
    """Names decide before parameters, as for TI: an MP2RAGE lists two inversion times."""
    assert _role(_enhanced("t1_mp2rage_sag", [700.0, 2500.0])) == "T1"
    assert _role(_enhanced("Ax T2 FLAIR", [2500.0, 150.0])) == "FLAIR"


def test_a_malformed_functional_group_is_not_an_error() -> None:
    ds = _ds("Sag 3D IR", ti=None)
    ds.SharedFunctionalGroupsSequence = [Dataset()]
    ds.PerFrameFunctionalGroupsSequence = []
    assert series_fields(ds).inversion_count == 0


def _series(sid: int, description: str, frames: int) -> Series:
    role = _role(_ds(description))
    return Series(id=sid, study_id=1, series_uid_index=f"s{sid}", role=role, instance_count=frames,
                  frame_count=frames)


def test_a_3d_dir_with_more_frames_does_not_win_over_the_flair() -> None:
    """A common MS protocol: 2D axial FLAIR (40 slices) plus 3D DIR (176): the model gets the FLAIR."""
    rows = [_series(1, "t2_spc_dir_sag_p2", 176), _series(2, "t2_tirm_tra_dark-fluid", 40),
            _series(3, "DIR_SPACE", 192)]
    chosen = choose_series(rows)
    assert chosen["FLAIR"].id == 2
    assert "DIR" not in chosen


def test_site_rules_name_dir_and_the_inversion_count(tmp_path: Path) -> None:
    config = tmp_path / "msgate.toml"
    config.write_text('[[rules.roles]]\nrole = "DIR"\nname = "site DIR"\ntext = "^SAG 3D CORTEX$"\n'
                      '[[rules.roles]]\nrole = "DIR"\ninversion_count_min = 2\n')
    roles = load_settings(config, home=tmp_path).rules.roles
    assert classify(series_fields(_ds("SAG 3D CORTEX")), roles) == (Role.DIR, "site DIR")
    assert classify(series_fields(_enhanced("x", [3000.0, 450.0])), roles) == (Role.DIR, "roles[1]")
    config.write_text('[[rules.roles]]\nrole = "DIR"\ninversion_count_min = 0\n')
    with pytest.raises(ConfigError, match="RULES"):
        load_settings(config, home=tmp_path)
