"""``msgate synth`` sub-app through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from msgate.cli.synth import app, parse_mix


def test_parse_mix() -> None:
    assert parse_mix("ms=0.7,csvd=0.3") == {"ms": 0.7, "csvd": 0.3}


def test_cli_writes_cohort(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--out", str(tmp_path), "--patients", "1", "--seed", "2", "--mix", "ms=1",
                                      "--ts", "rle", "--missing-rate", "0.2", "--resolution", "2",
                                      "--protocol", "2d"])
    assert result.exit_code == 0, result.output
    rec = json.loads((tmp_path / "labels.jsonl").read_text())
    assert rec["diagnosis"] == "ms"
    assert len(list((tmp_path / "hl7").glob("*.hl7"))) == 3


def test_cli_rejects_bad_mix(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--out", str(tmp_path), "--mix", "flu=1"])
    assert result.exit_code != 0
