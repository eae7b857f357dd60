"""What an operator sees for a mistyped command or a wrong setting: the real ``msgate`` process (typer's
CliRunner does not go through ``main()``), one line that names the cause, and exit 2 for invalid input or
configuration. "unexpected X; rerun with --debug" is the CLI admitting it did not understand the failure."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def run(home: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    full_env.update({"MSGATE_HOME": str(home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0", **env})
    return subprocess.run([sys.executable, "-m", "msgate", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("args,says", [
    (["serve", "--role", "bogus"], "--role"),
    (["keys", "retire"], "KEK_ID"),
    (["stauts"], "stauts"),
    (["status", "--jsn"], "--jsn"),
])
def test_a_usage_error_shows_the_usage_and_exits_2(tmp_path: Path, args: list[str], says: str) -> None:
    result = run(tmp_path / "home", *args)
    assert result.returncode == 2, result.stderr
    assert "Usage:" in result.stderr and says.lower() in result.stderr.lower(), result.stderr
    assert "unexpected" not in result.stderr and "Traceback" not in result.stderr


def test_status_of_an_unknown_role_is_refused_with_the_valid_names(tmp_path: Path) -> None:
    """`status --role bogus` reported a role that can never run as "down", like a crashed one."""
    result = run(tmp_path / "home", "status", "--role", "bogus", "--json")
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert "bogus" in result.stderr and all(name in result.stderr for name in ("dicom", "hl7", "keys"))


def test_a_misspelled_variable_is_refused_by_name(tmp_path: Path) -> None:
    """MSGATE_DATABSE_URL was ignored: the command ran on the embedded SQLite database instead."""
    result = run(tmp_path / "home", "db", "current", MSGATE_DATABSE_URL="postgresql+psycopg://u:pw@db/msgate")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "MSGATE_DATABSE_URL" in result.stderr and "pw" not in result.stderr
    assert not (tmp_path / "home" / "msgate.db").exists()


def test_a_list_setting_that_is_not_json_names_the_variable(tmp_path: Path) -> None:
    result = run(tmp_path / "home", "status", "--quiet", MSGATE_DICOM__ALLOWED_AETS="PACS1")
    assert result.returncode == 2
    assert "MSGATE_DICOM__ALLOWED_AETS" in result.stderr and '["PACS1"]' in result.stderr, result.stderr
    assert "EnvSettingsSource" not in result.stderr


def test_a_missing_secrets_dir_is_a_configuration_error(tmp_path: Path) -> None:
    """A wrong MSGATE_SECRETS_DIR gave a UserWarning, and the database URL in it fell back to SQLite."""
    result = run(tmp_path / "home", "db", "current", MSGATE_SECRETS_DIR=str(tmp_path / "nope"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "MSGATE_SECRETS_DIR" in result.stderr and "UserWarning" not in result.stderr


@pytest.mark.parametrize("url,says", [
    ("postgres://msgate:pw@127.0.0.1/msgate", "postgresql+psycopg://"),
    ("postgresql://msgate:pw@127.0.0.1/msgate", "postgresql+psycopg://"),
    ("mysql://msgate:pw@127.0.0.1/msgate", "postgresql+psycopg://"),
    ("notaurl", "sqlite:///"),
])
def test_an_unsupported_database_url_is_named(tmp_path: Path, url: str, says: str) -> None:
    result = run(tmp_path / "home", "status", "--json", MSGATE_DATABASE_URL=url)
    assert result.returncode == 2, result.stderr
    assert "MSGATE_DATABASE_URL" in result.stderr and says in result.stderr, result.stderr
    assert "unexpected" not in result.stderr and ":pw@" not in result.stderr


def test_status_on_a_database_that_cannot_be_opened_is_down_as_json(tmp_path: Path) -> None:
    """Opening the database failed before the probe (a SQLite path under a file): "unexpected", exit 1."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = run(tmp_path / "home", "status", "--json", MSGATE_DATABASE_URL=f"sqlite:///{afile}/sub/msgate.db")
    assert result.returncode == 2, result.stderr
    report = json.loads(result.stdout)
    assert report["health"] == "down" and report["database"]["health"] == "down"


def test_status_against_a_database_that_never_answers_is_bounded(tmp_path: Path) -> None:
    """A PostgreSQL host that accepts TCP but never answers (a hung server, a half-open firewall): every
    connection attempt waited forever, so `status` (the compose health check) hung instead of saying down."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes the handshake; nobody ever reads or answers
        port = silent.getsockname()[1]
        started = time.monotonic()
        result = run(tmp_path / "home", "status", "--json", timeout=90,
                     MSGATE_DATABASE_URL=f"postgresql+psycopg://msgate:pw@127.0.0.1:{port}/msgate")
        elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert json.loads(result.stdout)["database"]["health"] == "down"
    assert elapsed < 45, elapsed


def test_db_upgrade_against_an_unreachable_database_names_it(tmp_path: Path) -> None:
    port = closed_port()
    result = run(tmp_path / "home", "db", "upgrade",
                 MSGATE_DATABASE_URL=f"postgresql+psycopg://msgate:s3cret@127.0.0.1:{port}/msgate")
    assert result.returncode == 1
    assert f"postgresql+psycopg://msgate:***@127.0.0.1:{port}/msgate" in result.stderr, result.stderr
    assert "s3cret" not in result.stderr and "unexpected" not in result.stderr


def test_a_home_that_cannot_be_created_is_named_with_the_reason(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = run(afile / "home", "keys", "init")
    assert result.returncode != 0
    assert str(afile / "home") in result.stderr and "ENOTDIR" in result.stderr, result.stderr
    assert "unexpected" not in result.stderr
