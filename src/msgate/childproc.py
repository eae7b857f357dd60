"""msgate's helper processes (the DICOM and HL7 indexers): how a role starts one and how it starts up;
and :func:`settle_heap`, which the DICOM listener and its indexer process call once they have started.

The parent passes one end of a socketpair by number and the settings as JSON on stdin (never argv: they
may hold a database password); the child reads them, sets up logging like its parent and lowers its own
priority below the server it works for.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys

from msgate.config import Settings, load_settings
from msgate.log import setup_logging


def spawn(module: str, theirs: socket.socket, settings: Settings) -> subprocess.Popen[bytes]:
    """``python -m module FD`` with ``theirs`` passed as FD and ``settings`` on stdin."""
    proc = subprocess.Popen([sys.executable, "-m", module, str(theirs.fileno())], stdin=subprocess.PIPE,
                            pass_fds=(theirs.fileno(),))
    assert proc.stdin is not None
    proc.stdin.write(settings.model_dump_json().encode())
    proc.stdin.close()
    return proc


def start_child(nice: int) -> Settings:
    """In the child: stop signals ignored, settings from stdin, logging set up, priority lowered by
    ``nice`` (where allowed).

    SIGTERM and SIGINT are the parent's to act on. systemd (``KillMode=control-group``, its default) and
    a terminal's Ctrl-C signal every process of the service at once: the indexers died at once, the
    role logged "indexer exited; starting it again" as an error and started a new one while stopping,
    and HL7 application ACKs still waiting were never sent. The parent's stop message ends them after
    they drain; a parent that is gone closes their socket, and they exit on that."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    settings = load_settings(**json.loads(sys.stdin.read()))
    setup_logging(settings.log_level, settings.log_format)
    try:
        os.nice(nice)
    except OSError:
        pass
    return settings


def settle_heap() -> None:
    """Collect once, then freeze what a started service holds (modules, dictionaries, the store) out of the
    cyclic collector's sight (``gc.freeze``): later full collections walk only what came after, so they
    stall the process for far less. Called once a service process has started (not in tests that start a
    listener inside the test process)."""
    gc.collect()
    gc.freeze()
