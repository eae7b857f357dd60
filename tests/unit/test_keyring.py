"""Key ring files: permissions, refusal to overwrite, malformed files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from msgate.errors import ConfigError, KeyFilePermissions
from msgate.storage import keyring


def test_init_writes_0600_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "keyring.json"
    ring = keyring.init(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    loaded = keyring.load(path)
    assert loaded.active_id == ring.active_id and loaded.active.key == ring.active.key


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "keyring.json"
    keyring.init(path)
    with pytest.raises(ConfigError, match="already exists"):
        keyring.init(path)


@pytest.mark.parametrize("target,mode", [("file", 0o644), ("file", 0o640), ("dir", 0o755), ("dir", 0o770)])
def test_open_permissions_are_refused(tmp_path: Path, target: str, mode: int) -> None:
    path = tmp_path / "keys" / "keyring.json"
    keyring.init(path)
    os.chmod(path if target == "file" else path.parent, mode)
    with pytest.raises(KeyFilePermissions, match="chmod"):
        keyring.load(path)


def test_missing_and_malformed(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "keyring.json"
    with pytest.raises(ConfigError, match="keys init"):
        keyring.load(path)
    keyring.init(path)
    path.write_text('{"keks": []}')
    with pytest.raises(ConfigError, match="malformed"):
        keyring.load(path)


def test_rotate_and_retire_in_memory() -> None:
    ring = keyring.generate()
    rotated = ring.with_new_kek()
    assert rotated.active_id != ring.active_id and len(rotated.keks) == 2
    with pytest.raises(ConfigError):
        rotated.without(rotated.active_id)
    assert [k.id for k in rotated.without(ring.active_id).keks] == [rotated.active_id]


def test_key_ring_changes_are_serialised(tmp_path: Path) -> None:
    """`keys rotate` and `keys retire` (or two first starts) used to load, change and save the file
    unlocked: the last writer's stale copy dropped the KEK the other had just made active."""
    import threading

    path = tmp_path / "keys" / "keyring.json"
    first = keyring.init(path)
    done = threading.Event()

    def rotate() -> None:
        with keyring.locked(path):
            keyring.save(keyring.load(path).with_new_kek(), path)
        done.set()

    with keyring.locked(path):  # a retire in progress: loaded, checking, about to save
        stale = keyring.load(path)
        thread = threading.Thread(target=rotate)
        thread.start()
        assert not done.wait(0.3)  # the rotation waits for the lock
        keyring.save(stale, path)
    thread.join(5)
    ring = keyring.load(path)
    assert len(ring.keks) == 2 and ring.active_id != first.active_id  # the rotation is not lost
    again = [keyring.init(path, exist_ok=True) for _ in range(2)]  # a racing first start loads, never re-creates
    assert {r.index_key for r in again} == {first.index_key}
    assert not list(path.parent.glob("*.tmp"))


def test_key_ring_without_file_locks_still_works_and_drops_stale_copies(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Some network file systems refuse flock (ENOLCK): key commands failed with a raw traceback. A save
    that crashed left a full copy of the key ring in a temp file; the next locked change removes it."""
    import errno
    import fcntl

    path = tmp_path / "keys" / "keyring.json"
    keyring.init(path)
    stale = path.parent / f".{path.name}.123.abcd.tmp"
    stale.write_text("{}")

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with keyring.locked(path):
        keyring.save(keyring.load(path).with_new_kek(), path)
    assert len(keyring.load(path).keks) == 2 and not stale.exists()
