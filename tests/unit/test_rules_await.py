"""Routing rules' ``await_roles``: parsing, validation, what counts as present, and ``rules test``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from msgate.config import load_settings
from msgate.errors import ConfigError
from msgate.listener.rules import DEFAULT_ROUTING, ListenerRules, Role, RoutingRule, awaited_absent, decide

BRAIN_QSM = ('[[rules.routing]]\nname = "MS brain"\naction = "pipeline"\nmodality = ["MR"]\n'
             'required_roles = ["FLAIR"]\nawait_roles = ["QSM"]\n'
             '[[rules.routing]]\naction = "store_only"\nrequired_roles = []\n')


def test_default_awaits_nothing() -> None:
    """Without await_roles a FLAIR-only study stays ready at its release (the 1 s target)."""
    assert RoutingRule().await_roles == []
    assert all(rule.await_roles == [] for rule in DEFAULT_ROUTING)
    ds = Dataset()
    ds.Modality, ds.BodyPartExamined, ds.SeriesDescription = "MR", "BRAIN", "AX FLAIR"
    assert decide(ds, ListenerRules()).await_roles == ()


def test_await_roles_from_toml(tmp_path: Path) -> None:
    config = tmp_path / "msgate.toml"
    config.write_text(BRAIN_QSM)
    settings = load_settings(config, home=tmp_path)
    assert settings.rules.routing[0].await_roles == [Role.QSM]
    assert settings.rules.routing[1].await_roles == []
    ds = Dataset()
    ds.Modality, ds.SeriesDescription = "MR", "QSM"
    decision = decide(ds, settings.rules)
    assert (decision.route, decision.required_roles, decision.await_roles) == ("pipeline", (Role.FLAIR,),
                                                                               (Role.QSM,))


def test_await_roles_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSGATE_RULES__ROUTING", json.dumps([{"action": "pipeline", "await_roles": ["QSM", "T1"]}]))
    assert load_settings(home=tmp_path).rules.routing[0].await_roles == [Role.QSM, Role.T1]


@pytest.mark.parametrize(("await_roles", "extra", "message"), [
    ('["QSMX"]', "", "AWAIT_ROLES: Input should be 'FLAIR'"),  # not a role: refused like required_roles
    ('"QSM"', "", "RULES"),  # a string, not a list
    ('["QSM", "QSM"]', "", "more than once"),
    ('["FLAIR"]', "", "already in required_roles"),
    ('["QSM"]', 'action = "store_only"\n', "pipeline rules only"),
    ('["QSM"]', 'action = "ignore"\n', "pipeline rules only"),
])
def test_bad_await_roles_stop_the_command(tmp_path: Path, await_roles: str, extra: str, message: str) -> None:
    config = tmp_path / "msgate.toml"
    config.write_text(f'[[rules.routing]]\n{extra}required_roles = ["FLAIR"]\nawait_roles = {await_roles}\n')
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(config, home=tmp_path)
    assert "RULES" in str(caught.value).upper()


def test_validation_in_the_model() -> None:
    with pytest.raises(ValidationError, match="already in required_roles"):
        RoutingRule(required_roles=[Role.FLAIR, Role.QSM], await_roles=[Role.QSM])
    assert RoutingRule(action="store_only", required_roles=[], await_roles=[]).await_roles == []
    assert RoutingRule(required_roles=[], await_roles=[Role.FLAIR]).await_roles == [Role.FLAIR]


def test_what_counts_as_present() -> None:
    """The model reads a QSM map series only: magnitude/phase sources do not stand in for it."""
    assert awaited_absent([Role.QSM], {"FLAIR", "QSM"}) == []
    assert awaited_absent([Role.QSM], {"FLAIR", "QSM_SOURCE"}) == ["QSM"]
    assert awaited_absent([Role.QSM], {"FLAIR", "SWI"}) == ["QSM"]
    assert awaited_absent([Role.QSM_SOURCE], {"FLAIR", "QSM_SOURCE"}) == []
    assert awaited_absent([Role.T1, Role.QSM], {"FLAIR"}) == ["QSM", "T1"]
    assert awaited_absent(["QSM"], {"QSM"}) == [] and awaited_absent([], {"FLAIR"}) == []


def _file(path: Path, description: str, study_uid: str) -> Path:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.SeriesDescription = "MR", "BRAIN", description
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_rules_test_shows_awaited_roles_and_presence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Presence is among the files given for the same study: a FLAIR alone would be held, a FLAIR with
    its QSM would not; QSM magnitude/phase files are not a QSM."""
    from msgate.cli import rules_cmd
    from msgate.cli.app import app

    if "rules" not in {group.name for group in app.registered_groups}:
        app.add_typer(rules_cmd.app, name="rules")
    config = tmp_path / "msgate.toml"
    config.write_text(BRAIN_QSM)
    one, two, three = generate_uid(), generate_uid(), generate_uid()
    flair_alone = _file(tmp_path / "a.dcm", "AX FLAIR", one)
    flair = _file(tmp_path / "b1.dcm", "AX FLAIR", two)
    qsm = _file(tmp_path / "b2.dcm", "QSM", two)
    flair_src = _file(tmp_path / "c1.dcm", "AX FLAIR", three)
    source = _file(tmp_path / "c2.dcm", "SWI phase", three)
    env = {"MSGATE_HOME": str(tmp_path / "home"), "MSGATE_STORAGE__MIN_FREE_BYTES": "0"}
    runner = CliRunner()
    files = [str(p) for p in (flair_alone, flair, qsm, flair_src, source)]
    result = runner.invoke(app, ["--config", str(config), "rules", "test", "--json", *files], env=env)
    assert result.exit_code == 0, result.output
    got = [(d["role"], d["await_roles"], d["awaited_absent"]) for d in json.loads(result.output)]
    assert got == [("FLAIR", ["QSM"], ["QSM"]), ("FLAIR", ["QSM"], []), ("QSM", ["QSM"], []),
                   ("FLAIR", ["QSM"], ["QSM"]), ("QSM_SOURCE", ["QSM"], ["QSM"])]
    from msgate.cli import common

    monkeypatch.setattr(common.console, "width", 300)  # one line per row, whatever the terminal
    table = runner.invoke(app, ["--config", str(config), "rules", "test", str(flair_alone), str(flair), str(qsm)],
                          env=env)
    assert table.exit_code == 0, table.output
    assert "awaited roles" in table.output and "QSM absent" in table.output and "QSM present" in table.output
    plain = runner.invoke(app, ["rules", "test", "--json", str(flair_alone)], env=env)  # default rules
    assert plain.exit_code == 0, plain.output
    assert [(d["await_roles"], d["awaited_absent"]) for d in json.loads(plain.output)] == [([], [])]
