"""``msgate serve`` exit status as a supervisor sees it: a crashed role is a failure (status 1), an invalid
setting is refused before any role starts (status 2, naming the setting)."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _serve(home: Path, role: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    full_env.update({"MSGATE_HOME": str(home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
                     "MSGATE_METRICS__ENABLED": "false", **env})
    return subprocess.run([sys.executable, "-m", "msgate", "serve", "--role", role], capture_output=True,
                          text=True, env=full_env, timeout=120)


def test_a_crashed_role_exits_non_zero(tmp_path: Path) -> None:
    """The DICOM role cannot bind its port (in use): it crashes, the process shuts down and exits 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve(tmp_path / "home", "dicom", MSGATE_DICOM__PORT=str(port))
    assert "role crashed" in result.stderr and "msgate stopped" in result.stderr
    assert result.returncode == 1, result.stderr[-2000:]
    crash = next(json.loads(line) for line in result.stderr.splitlines() if '"role crashed"' in line)
    # Only "error_type": "OSError" was logged: nothing said which port, or why.
    assert crash["code"] == "EADDRINUSE" and crash["port"] == port, crash
    assert crash["reason"] == os.strerror(errno.EADDRINUSE)


def test_a_tls_file_that_is_not_pem_is_refused_before_the_role_starts(tmp_path: Path) -> None:
    """A readable file that is not a certificate passed the check; the role then crashed at start with only
    "SSLError" in its log and exit 1, a silent restart loop under compose."""
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    result = _serve(tmp_path / "home", "dicom", MSGATE_DICOM__PORT="0", MSGATE_DICOM__TLS__ENABLED="true",
                    MSGATE_DICOM__TLS__CERT_FILE=str(junk), MSGATE_DICOM__TLS__KEY_FILE=str(junk))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "MSGATE_DICOM__TLS__CERT_FILE" in result.stderr and "msgate started" not in result.stderr


def test_bad_tls_path_is_refused_before_the_role_starts(tmp_path: Path) -> None:
    result = _serve(tmp_path / "home", "dicom", MSGATE_DICOM__PORT="0", MSGATE_DICOM__TLS__ENABLED="true",
                    MSGATE_DICOM__TLS__CERT_FILE=str(tmp_path / "server.pem"),
                    MSGATE_DICOM__TLS__KEY_FILE=str(tmp_path / "server.key"))
    assert result.returncode == 2
    assert "MSGATE_DICOM__TLS__CERT_FILE" in result.stderr and "msgate started" not in result.stderr
    assert "Traceback" not in result.stderr


def _wait_listening(proc: subprocess.Popen[str] | subprocess.Popen[bytes], port: int) -> None:
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("role", ["dicom", "hl7"])
def test_a_stop_signal_to_the_whole_service_stops_it_in_order(tmp_path: Path, role: str) -> None:
    """systemd (KillMode=control-group) and Ctrl-C signal every process of the service: the indexers died
    at once, and the role logged "indexer exited; starting it again" as an error and started a new one
    while it was stopping. The indexers now leave stop signals to the role, which ends them in order."""
    import signal
    import time

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    env.update({"MSGATE_HOME": str(tmp_path / "home"), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
                "MSGATE_METRICS__ENABLED": "false", f"MSGATE_{role.upper()}__PORT": str(port)})
    proc = subprocess.Popen([sys.executable, "-m", "msgate", "serve", "--role", role], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_listening(proc, port)
        time.sleep(1.0)  # the indexer process is up and ready by now
        os.killpg(proc.pid, signal.SIGTERM)  # every process of the group, as systemd does
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-2000:]
    assert "msgate stopped" in err and "indexer exited" not in err, err[-3000:]


@pytest.mark.parametrize("role", ["hl7", "dicom"])
def test_a_second_listener_on_the_same_home_stops_before_it_touches_the_journal(tmp_path: Path, role: str) -> None:
    """A second `serve --role hl7|dicom` on a home in use took the running one's live journal segments
    for a crash's leftovers, indexed and deleted them, and the running one went on acknowledging into
    deleted files: lost at its next restart. The second one now stops first, naming the reason."""
    import signal

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    env.update({"MSGATE_HOME": str(home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0", "MSGATE_METRICS__ENABLED": "false"})
    first_port, second_port = _free_port(), _free_port()
    first = subprocess.Popen([sys.executable, "-m", "msgate", "serve", "--role", role],
                             env={**env, f"MSGATE_{role.upper()}__PORT": str(first_port)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_listening(first, first_port)
        journal = home / f"{role}-journal"
        segments = sorted(p.name for p in journal.glob("*.jnl"))
        assert segments, "the running listener has its journal segments"
        second = subprocess.run([sys.executable, "-m", "msgate", "serve", "--role", role],
                                env={**env, f"MSGATE_{role.upper()}__PORT": str(second_port)},
                                capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and "home_in_use" in second.stderr, second.stderr[-2000:]
        assert sorted(p.name for p in journal.glob("*.jnl")) == segments  # nothing of the first one's touched
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(60)
