"""The publish role warns at start about results that would go nowhere (no PACS, no interface engine)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from msgate.config import Settings
from msgate.results.outbox import warn_unrouted


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(home=tmp_path, **kw)  # type: ignore[arg-type]


def test_no_destinations_warns_for_both(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="msgate.results.outbox"):
        found = warn_unrouted(_settings(tmp_path))
    assert len(found) == 2
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "MSGATE_PACS" in text and "MSGATE_HL7_OUT" in text


def test_only_the_missing_destination_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = _settings(tmp_path, pacs=[{"name": "pacs", "host": "127.0.0.1", "port": 11112, "ae_title": "PACS"}])
    with caplog.at_level(logging.WARNING, logger="msgate.results.outbox"):
        found = warn_unrouted(settings)
    assert found == [m for m in found if "MSGATE_HL7_OUT" in m] and len(found) == 1


def test_both_configured_is_silent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = _settings(tmp_path, pacs=[{"name": "pacs", "host": "127.0.0.1", "port": 11112, "ae_title": "PACS"}],
                         hl7_out={"host": "127.0.0.1", "port": 2576})
    with caplog.at_level(logging.WARNING, logger="msgate.results.outbox"):
        assert warn_unrouted(settings) == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
