"""`msgate status` as a person sees it: rendered in a real 80-column tmux pane, no wrapped garbage."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_status_fits_an_80_column_pane(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "MSGATE_HOME": str(home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0"}
    subprocess.run([sys.executable, "-m", "msgate", "keys", "init"], env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "msgate", "db", "upgrade"], env=env, check=True, capture_output=True)
    session = f"msgate-{uuid.uuid4().hex[:8]}"
    done = tmp_path / "done"
    cmd = (f"MSGATE_HOME={shlex.quote(str(home))} MSGATE_STORAGE__MIN_FREE_BYTES=0 "
           f"{shlex.quote(sys.executable)} -m msgate status; echo EXIT=$? > {shlex.quote(str(done))}")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "40", cmd + "; sleep 30"],
                   check=True, env={**os.environ, "TERM": "xterm-256color"})
    try:
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.3)
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-J", "-t", session], capture_output=True, text=True,
                                check=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert done.read_text().strip() == "EXIT=2", screen  # nothing running yet: down
    lines = [line for line in screen.splitlines() if line.strip()]
    assert lines[0].startswith("msgate DOWN")
    assert all(len(line) <= 80 for line in lines)
    for component in ("database", "keys", "disk", "broker", "role dicom", "role hl7", "outbox"):
        assert any(line.startswith(component) for line in lines), component
    assert "Traceback" not in screen and "\x1b" not in screen
