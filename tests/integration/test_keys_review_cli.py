"""`msgate keys` as operators run it while services are up, and the warning `keys retire` owes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from msgate.config import load_settings
from msgate.storage.store import open_store

pytestmark = pytest.mark.integration


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MSGATE_HOME": str(home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "msgate", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_a_running_role_reads_what_keys_rotate_rewrapped(tmp_path: Path) -> None:
    """The reviewer's case: a publish role and a worker opened their store, then `keys rotate` ran. The
    outbox dead-lettered the pending result on its first try ('the stored message cannot be decrypted')
    and the worker could not load the acknowledged instance."""
    home = tmp_path / "home"
    assert run(home, "keys", "init").returncode == 0
    store = open_store(load_settings(home=home, storage={"min_free_bytes": 0}))
    try:
        with store.db.session() as s:
            image = store.blobs.put(s, kind="dicom", source=b"an acknowledged instance").id
            result = store.blobs.put(s, kind="hl7", source=b"MSH|^~\\&|X\r").id  # an ORU waiting in the outbox
        rotated = run(home, "keys", "rotate")
        assert rotated.returncode == 0, rotated.stderr
        with store.db.session() as s:
            assert store.blobs.read(s, image) == b"an acknowledged instance"
            assert store.blobs.read(s, result) == b"MSH|^~\\&|X\r"
        status = json.loads(run(home, "keys", "status", "--json").stdout)
        assert store.ring.active_id == next(k["id"] for k in status["keys"] if k["active"])
    finally:
        store.close()


def test_keys_retire_warns_that_older_backups_need_the_older_key_ring(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run(home, "keys", "init").returncode == 0
    assert run(home, "db", "upgrade").returncode == 0
    old = json.loads((home / "keys" / "keyring.json").read_text())["active"]
    assert run(home, "keys", "rotate").returncode == 0
    retired = run(home, "keys", "retire", old)
    assert retired.returncode == 0, retired.stderr
    text = " ".join(retired.stdout.split())
    assert f"retired {old}" in text
    assert "backups taken before now" in text and "Keep the key ring backup taken with each database backup" in text
