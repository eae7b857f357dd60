"""``MSGATE_WORKERS__REQUIRED_EHR_FIELDS`` names EHR features of the model's schema (model/features.py). A name
that is not one was accepted, and the scheduler then never waited for it (it only waits for names among the
missing features): a typo silently turned the wait off."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from msgate.config import load_settings
from msgate.errors import ConfigError
from msgate.model.features import FEATURES


def test_an_unknown_field_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(home=tmp_path, workers={"required_ehr_fields": ["age", "edss_score"]})
    message = str(caught.value)
    assert "MSGATE_WORKERS__REQUIRED_EHR_FIELDS" in message and "'edss_score'" in message
    assert all(spec.name in message for spec in FEATURES)  # the valid names are listed


def test_an_unknown_field_from_the_environment_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSGATE_WORKERS__REQUIRED_EHR_FIELDS", '["sex", "agee"]')
    with pytest.raises(ConfigError, match="'agee'"):
        load_settings(home=tmp_path)


@pytest.mark.parametrize("fields", [[], ["age", "sex"], ["nfl", "dmt", "sdmt"]])
def test_known_fields_load(tmp_path: Path, fields: list[str]) -> None:
    assert load_settings(home=tmp_path, workers={"required_ehr_fields": fields}).workers.required_ehr_fields == fields


def test_the_check_keeps_light_roles_torch_free(tmp_path: Path) -> None:
    code = ("import sys; from msgate.config import load_settings; "
            f"load_settings(home={str(tmp_path)!r}, workers={{'required_ehr_fields': ['nfl']}}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
