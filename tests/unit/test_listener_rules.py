"""Series-role and routing rules: vendor naming, ordering, configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from msgate.config import load_settings
from msgate.errors import ConfigError
from msgate.listener.rules import ListenerRules, Role, RoleRule, RoutingRule, classify, decide, series_fields


def _ir(ti: float) -> dict[str, object]:
    """A spin-echo inversion recovery with this TI (ms)."""
    return {"ScanningSequence": ["SE", "IR"], "InversionTime": ti}


VENDOR_NAMES = [
    # Siemens
    ("t2_tirm_tra_dark-fluid", {}, Role.FLAIR),
    ("t2_space_dark-fluid_sag_p2_iso", {}, Role.FLAIR),
    ("t2_space_dark-fluid_sag_p2_iso_MPR_tra", {}, Role.DERIVED),
    ("T1 MPRAGE", {}, Role.T1),
    ("t1_mprage_sag_p2_iso", {}, Role.T1),
    ("QSM", {}, Role.QSM),
    ("SWI phase", {}, Role.QSM_SOURCE),
    ("SWI magnitude", {}, Role.QSM_SOURCE),
    ("qsm_mag", {}, Role.QSM_SOURCE),
    ("SWI_Images", {}, Role.SWI),
    ("mIP_Images(SW)", {}, Role.DERIVED),
    ("t2_tse_tra", {}, Role.T2),
    ("t1_tirm_tra_dark-fluid", _ir(860), Role.T1),  # T1-weighted dark-fluid, not FLAIR
    ("t1_tirm_tra", _ir(860), Role.T1),
    ("t2_tirm_tra_dark-fluid", _ir(2500), Role.FLAIR),
    # GE
    ("AX FLAIR", {}, Role.FLAIR),
    ("3D FLAIR", {}, Role.FLAIR),
    ("Sag FLAIR CUBE", {}, Role.FLAIR),
    ("BRAVO", {}, Role.T1),
    ("Ax SWAN", {}, Role.SWI),
    ("AX T2 FSE", {}, Role.T2),
    ("Sag T1 FLAIR", _ir(750), Role.T1),  # GE T1 FLAIR: T1-weighted, was taken as the model's FLAIR
    ("Ax T1 FLAIR Post", _ir(920), Role.T1),
    ("Ax T1 FLAIR +C", {}, Role.T1),
    ("COR T1FLAIR", {}, Role.T1),
    ("T2 FLAIR", {}, Role.FLAIR),
    ("Ax T2 FLAIR", _ir(2500), Role.FLAIR),
    ("Sag CUBE FLAIR", _ir(1800), Role.FLAIR),
    # Philips
    ("T2W_FLAIR", {}, Role.FLAIR),
    ("T1W_FLAIR", _ir(800), Role.T1),
    ("T1W_FLAIR SENSE", {}, Role.T1),
    ("sT1W_3D_TFE", {}, Role.T1),
    ("SWIp", {}, Role.SWI),
    # parameters only
    ("", _ir(2500), Role.FLAIR),
    ("", {"ScanningSequence": ["GR", "IR"], "InversionTime": 900}, Role.T1),
    # a FLAIR-named series with a short TI is T1-weighted (CSF is nulled at TI >= ~1500 ms); TI 0 is unset
    ("AX FLAIR", _ir(860), Role.T1),
    ("AX FLAIR", _ir(0), Role.FLAIR),
    ("AX FLAIR", _ir(1650), Role.FLAIR),
    ("", {"ImageType": ["ORIGINAL", "PRIMARY", "P", "ND"], "ScanningSequence": "GR"}, Role.QSM_SOURCE),
    ("", {"ImageType": ["DERIVED", "SECONDARY", "REFORMATTED"]}, Role.DERIVED),
    ("localizer", {}, Role.OTHER),
    ("Ax DWI", {}, Role.OTHER),
]


def _ds(description: str, **attrs: object) -> Dataset:
    ds = Dataset()
    if description:
        ds.SeriesDescription = description
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(("description", "attrs", "role"), VENDOR_NAMES)
def test_default_roles_for_vendor_naming(description: str, attrs: dict[str, object], role: Role) -> None:
    assert classify(series_fields(_ds(description, **attrs)), ListenerRules().roles)[0] is role


def test_protocol_name_counts_when_description_is_empty() -> None:
    ds = _ds("", ProtocolName="AX FLAIR")
    assert classify(series_fields(ds), ListenerRules().roles)[0] is Role.FLAIR


@pytest.mark.parametrize(("description", "protocol", "attrs", "role"), [
    ("Ax T2 FLAIR", "MS BRAIN SWAN", _ir(2500), Role.FLAIR),  # GE: the exam's protocol on every series
    ("Ax T2 FLAIR", "MS BRAIN SWAN", {}, Role.FLAIR),
    ("Sag CUBE FLAIR", "MS QSM RESEARCH", {}, Role.FLAIR),
    ("Sag T1 FLAIR", "MS BRAIN SWAN", {}, Role.T1),
    ("Ax SWAN", "MS BRAIN SWAN", {}, Role.SWI),
    ("Mag_Images", "t2_swi3d_tra_p2", {"ScanningSequence": "GR"}, Role.QSM_SOURCE),  # name in protocol
    ("", "Ax SWAN", {}, Role.SWI),
])
def test_series_description_decides_before_protocol_name(description: str, protocol: str,
                                                          attrs: dict[str, object], role: Role) -> None:
    """SeriesDescription and ProtocolName were one text, so the SWI/QSM rules (before FLAIR) matched GE's
    exam-level protocol: "Ax T2 FLAIR" in an "MS BRAIN SWAN" exam was SWI and the study never ran."""
    ds = _ds(description, ProtocolName=protocol, **attrs)
    assert classify(series_fields(ds), ListenerRules().roles)[0] is role


def test_site_text_rule_reads_the_protocol_name_as_a_fallback() -> None:
    """A site rule's ``text`` is the SeriesDescription, then SeriesDescription + ProtocolName."""
    site = [RoleRule(role=Role.QSM, name="site QSM", text="RESEARCH QSM"),
            RoleRule(role=Role.FLAIR, name="site FLAIR", text="^AX FLAIR$")]
    flair = series_fields(_ds("AX FLAIR", ProtocolName="RESEARCH QSM"))
    assert classify(flair, site) == (Role.FLAIR, "site FLAIR")
    qsm = series_fields(_ds("x", ProtocolName="RESEARCH QSM"))
    assert classify(qsm, site) == (Role.QSM, "site QSM (with ProtocolName)")
    assert classify(series_fields(_ds("", ProtocolName="RESEARCH QSM")), site)[0] is Role.QSM
    assert classify(series_fields(_ds("x", ProtocolName="y")), site) == (Role.OTHER, "no rule matched")


def test_rules_are_ordered_first_match_wins() -> None:
    custom = [RoleRule(role=Role.OTHER, name="site override", text="AX FLAIR ZOOM"), *ListenerRules().roles]
    assert classify(series_fields(_ds("AX FLAIR ZOOM")), custom) == (Role.OTHER, "site override")


def test_routing_defaults_and_first_match() -> None:
    rules = ListenerRules()
    brain = _ds("AX FLAIR", Modality="MR", BodyPartExamined="BRAIN")
    assert (decide(brain, rules).route, decide(brain, rules).required_roles) == ("pipeline", (Role.FLAIR,))
    assert decide(_ds("AX", Modality="MR", BodyPartExamined="KNEE"), rules).route == "store_only"
    assert decide(_ds("AX", Modality="CT"), rules).route == "store_only"
    ignore = ListenerRules(routing=[RoutingRule(action="ignore", calling_aet=["RESEARCH"], required_roles=[]),
                                    *rules.routing])
    assert decide(brain, ignore, calling_aet="RESEARCH").route == "ignore"
    assert decide(brain, ignore, calling_aet="SCANNER1").route == "pipeline"
    by_desc = ListenerRules(routing=[RoutingRule(action="pipeline", study_description=r"\bMS\b",
                                                 required_roles=[Role.FLAIR, Role.QSM])])
    ds = _ds("x", Modality="MR", StudyDescription="MRI BRAIN MS PROTOCOL")
    assert decide(ds, by_desc).required_roles == (Role.FLAIR, Role.QSM)
    assert decide(_ds("x", Modality="MR", StudyDescription="KNEE"), by_desc).route == "store_only"


def test_rules_from_toml_and_bad_regex_named(tmp_path: Path) -> None:
    config = tmp_path / "msgate.toml"
    config.write_text('[[rules.routing]]\naction = "ignore"\nmodality = ["CT"]\nrequired_roles = []\n'
                      '[[rules.roles]]\nrole = "FLAIR"\ntext = "DARKFLUIDX"\n')
    settings = load_settings(config, home=tmp_path)
    assert settings.rules.routing[0].action == "ignore" and len(settings.rules.roles) == 1
    config.write_text('[[rules.roles]]\nrole = "FLAIR"\ntext = "(unclosed"\n')
    with pytest.raises(ConfigError, match="RULES"):
        load_settings(config, home=tmp_path)


@pytest.mark.parametrize(("modality", "sop_class"), [
    ("SEG", "1.2.840.10008.5.1.4.1.1.66.4"),  # a lesion segmentation named after its FLAIR
    ("SR", "1.2.840.10008.5.1.4.1.1.88.33"),
    ("MR", "1.2.840.10008.5.1.4.1.1.30"),  # a parametric map keeps the source modality
    ("PR", "1.2.840.10008.5.1.4.1.1.11.1"),
    ("KO", "1.2.840.10008.5.1.4.1.1.88.59"),
])
def test_non_image_objects_never_take_an_image_role(modality: str, sop_class: str) -> None:
    """A SEG described "AX FLAIR lesion segmentation" became the study's FLAIR series."""
    ds = Dataset()
    ds.SeriesDescription, ds.Modality, ds.SOPClassUID = "AX FLAIR lesion segmentation", modality, sop_class
    assert decide(ds, ListenerRules()).role is Role.OTHER
    ds.Modality, ds.SOPClassUID = "MR", "1.2.840.10008.5.1.4.1.1.4"
    assert decide(ds, ListenerRules()).role is Role.FLAIR
