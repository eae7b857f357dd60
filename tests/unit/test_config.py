"""Settings: env prefix and nesting, TOML file, and one clear error naming the bad setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from msgate.config import load_settings
from msgate.errors import ConfigError


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MSGATE_HOME", raising=False)
    s = load_settings()
    assert s.home == Path("./var") and s.dicom.port == 11112 and s.dicom.ae_title == "MSGATE"
    assert s.hl7.port == 2575 and s.metrics.port == 9464
    assert s.resolved_database_url.startswith("sqlite:///") and s.is_embedded
    assert s.resolved_broker_url.startswith("sqla+sqlite:///")


def test_env_nested_and_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MSGATE_HOME", str(tmp_path))
    monkeypatch.setenv("MSGATE_DICOM__PORT", "11113")
    monkeypatch.setenv("MSGATE_DICOM__ALLOWED_AETS", '["PACS1","ROUTER"]')
    s = load_settings()
    assert s.home == tmp_path and s.dicom.port == 11113 and s.dicom.allowed_aets == ["PACS1", "ROUTER"]
    assert s.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'msgate.db'}"


def test_toml_file_and_env_priority(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "msgate.toml"
    cfg.write_text('[dicom]\nae_title = "FROMFILE"\nport = 4242\n[hl7]\nport = 2600\n'
                   '[[pacs]]\nname = "main"\nhost = "10.0.0.5"\nport = 104\nae_title = "PACS"\n')
    monkeypatch.setenv("MSGATE_DICOM__PORT", "5000")
    s = load_settings(cfg)
    assert s.dicom.ae_title == "FROMFILE" and s.dicom.port == 5000 and s.hl7.port == 2600
    assert s.pacs[0].host == "10.0.0.5"


@pytest.mark.parametrize("env,value,name", [
    ("MSGATE_DICOM__PORT", "notaport", "MSGATE_DICOM__PORT"),
    ("MSGATE_DICOM__AE_TITLE", "X" * 17, "MSGATE_DICOM__AE_TITLE"),
    ("MSGATE_HL7__ALLOWED_NETWORKS", '["10.0.0.0/33"]', "MSGATE_HL7__ALLOWED_NETWORKS"),
    ("MSGATE_DATABASE_URL", "postgresql+psycopg://msgate:changeme@db/msgate", "MSGATE_DATABASE_URL"),
    ("MSGATE_LOG_LEVEL", "LOUD", "MSGATE_LOG_LEVEL"),
])
def test_invalid_setting_is_named(monkeypatch: pytest.MonkeyPatch, env: str, value: str, name: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert name in str(err.value)


def test_missing_config_file_and_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nportt = 1\n")
    with pytest.raises(ConfigError, match="MSGATE_DICOM__PORTT"):
        load_settings(bad)


def test_job_lease_is_the_hard_limit_plus_the_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSGATE_WORKERS__LEASE_MARGIN_SECONDS", "2.5")
    wk = load_settings(workers={"soft_time_limit": 3, "hard_time_limit": 4, "visibility_timeout": 6}).workers
    assert wk.lease_seconds == 6.5
    monkeypatch.delenv("MSGATE_WORKERS__LEASE_MARGIN_SECONDS")
    assert load_settings().workers.lease_seconds == 900 + 30  # the defaults
