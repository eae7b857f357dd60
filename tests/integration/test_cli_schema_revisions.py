"""A home of another schema revision, through the real ``msgate`` process (``main()`` maps errors to exit
codes): the commands said "unexpected CommandError", `status` said ok, and read-only commands migrated an
older database. Now only serve and ``db upgrade`` migrate; the others refuse by name with exit 2."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from msgate.storage.db import MIGRATIONS
from tests.integration.test_cli_operator_errors import closed_port, run

pytestmark = pytest.mark.integration
HEAD = ScriptDirectory(str(MIGRATIONS)).get_current_head()


def _home(tmp_path: Path, revision: str = "head") -> Path:
    home = tmp_path / "home"
    assert run(home, "keys", "init").returncode == 0
    upgraded = run(home, "db", "upgrade", "--revision", revision)
    assert upgraded.returncode == 0, upgraded.stderr
    return home


def _stamp(home: Path, revision: str) -> None:
    with sqlite3.connect(home / "msgate.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (revision,))


def test_a_newer_schema_is_refused_by_name_with_exit_2(tmp_path: Path) -> None:
    home = _home(tmp_path)
    _stamp(home, "0099")  # as a newer msgate leaves it
    for args in (("studies", "list"), ("audit", "verify"), ("db", "upgrade")):
        result = run(home, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "0099" in result.stderr and HEAD in result.stderr and "newer msgate" in result.stderr
        assert "unexpected" not in result.stderr
    served = run(home, "serve", "--role", "hl7", timeout=60, MSGATE_HL7__PORT=str(closed_port()),
                 MSGATE_METRICS__ENABLED="false")
    assert served.returncode == 2 and "0099" in served.stderr, served.stderr
    status = run(home, "status", "--role", "hl7", "--json")
    database = json.loads(status.stdout)["database"]
    assert database["health"] == "degraded" and database["revision"] == "0099", database
    assert status.returncode >= 1


def test_an_older_schema_is_not_migrated_by_a_check(tmp_path: Path) -> None:
    """`audit verify`, documented as a check, migrated a restored older backup."""
    home = _home(tmp_path, "0003")
    refused = run(home, "audit", "verify")
    assert refused.returncode == 2 and "msgate db upgrade" in refused.stderr, refused.stderr
    assert run(home, "db", "current").stdout.strip() == "0003"
    assert run(home, "db", "upgrade").returncode == 0
    assert run(home, "audit", "verify").returncode == 0


def test_alembic_errors_are_named_not_unexpected(tmp_path: Path) -> None:
    home = _home(tmp_path)
    result = run(home, "db", "upgrade", "--revision", "0099")
    assert result.returncode == 2, result.stderr
    assert "database migration failed" in result.stderr and "0099" in result.stderr
    assert "unexpected" not in result.stderr
