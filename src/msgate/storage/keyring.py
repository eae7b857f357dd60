"""The key ring: key-encryption keys (KEKs) with ids, and the blind-index key.

A JSON file under ``MSGATE_HOME/keys``, mode 0600, made by ``msgate keys init``. The service refuses
to start when the file or its folder is readable by group or others. ``rotate`` adds a new active
KEK; old KEKs stay until every data key they wrap has been re-wrapped, then they can be retired.
A running process that meets a KEK id it has not loaded re-reads the file (:func:`newer`), so a
rotation made while it runs does not make the data re-wrapped under the new KEK unreadable to it.
In production, put the file on an encrypted volume or mount it as a secret (see docs/operations.md).
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from msgate.errors import ConfigError, KeyFilePermissions, KeyNotFound

log = logging.getLogger(__name__)

KEY_BYTES = 32


@dataclass(frozen=True)
class Kek:
    """One key-encryption key. ``retired`` keys are kept for reading only until dropped."""

    id: str
    key: bytes = field(repr=False)
    created: datetime
    retired: bool = False


@dataclass(frozen=True)
class KeyRing:
    """The loaded key ring. ``index_key`` keys the HMAC blind indexes and the log hashes."""

    keks: tuple[Kek, ...]
    active_id: str
    index_key: bytes = field(repr=False)
    path: Path | None = None
    stamp: tuple[int, int, int] | None = field(default=None, compare=False, repr=False)  # the file as loaded

    @property
    def active(self) -> Kek:
        return self.get(self.active_id)

    def has(self, kek_id: str) -> bool:
        return any(kek.id == kek_id for kek in self.keks)

    def get(self, kek_id: str) -> Kek:
        for kek in self.keks:
            if kek.id == kek_id:
                return kek
        raise KeyNotFound(f"key {kek_id!r} is not in the key ring; restore it from backup")

    def with_new_kek(self) -> KeyRing:
        kek = _new_kek(len(self.keks) + 1)
        return KeyRing(keks=(*self.keks, kek), active_id=kek.id, index_key=self.index_key, path=self.path)

    def without(self, kek_id: str) -> KeyRing:
        if kek_id == self.active_id:
            raise ConfigError("cannot retire the active key; rotate first")
        if not self.has(kek_id):  # a mistyped id, not a lost key: no backup to restore
            raise KeyNotFound(f"no key {kek_id!r} in the key ring; `msgate keys status` lists its key ids")
        return KeyRing(
            keks=tuple(k for k in self.keks if k.id != kek_id),
            active_id=self.active_id, index_key=self.index_key, path=self.path,
        )


def _new_kek(serial: int) -> Kek:
    now = datetime.now(UTC)
    kek_id = f"kek-{now:%Y%m%d%H%M%S}-{serial:03d}-{secrets.token_hex(2)}"
    return Kek(id=kek_id, key=secrets.token_bytes(KEY_BYTES), created=now)


def generate() -> KeyRing:
    kek = _new_kek(1)
    return KeyRing(keks=(kek,), active_id=kek.id, index_key=secrets.token_bytes(KEY_BYTES))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def save(ring: KeyRing, path: Path) -> None:
    """Write atomically with mode 0600 (temp file, fsync, rename, fsync of the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    doc = {
        "format": 1,
        "active": ring.active_id,
        "index_key": _b64(ring.index_key),
        "keks": [
            {"id": k.id, "key": _b64(k.key), "created": k.created.isoformat(), "retired": k.retired}
            for k in ring.keks
        ],
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # one per writer
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, json.dumps(doc, indent=1).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def check_permissions(path: Path) -> None:
    """Refuse a key file or folder that group or others can read or write."""
    for target in (path, path.parent):
        mode = stat.S_IMODE(target.stat().st_mode)
        if mode & 0o077:
            raise KeyFilePermissions(
                f"{target} has mode {mode:04o}; key material must not be accessible to group or others "
                f"(chmod {'600' if target == path else '700'} {target})"
            )


def _stamp(path: Path) -> tuple[int, int, int]:
    """Identifies one version of the file: every save renames a new file into place."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def load(path: Path) -> KeyRing:
    """Load and check the key ring; a clear error if it is missing, too open or malformed."""
    if not path.exists():
        raise ConfigError(f"no key ring at {path}; run `msgate keys init`")
    check_permissions(path)
    stamp = _stamp(path)  # before the read: a save in between makes the next check read it again
    try:
        doc = json.loads(path.read_text())
        keks = tuple(
            Kek(id=k["id"], key=base64.b64decode(k["key"]), created=datetime.fromisoformat(k["created"]),
                retired=bool(k.get("retired", False)))
            for k in doc["keks"]
        )
        ring = KeyRing(keks=keks, active_id=doc["active"], index_key=base64.b64decode(doc["index_key"]), path=path,
                       stamp=stamp)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"key ring {path} is malformed ({type(exc).__name__})") from None
    if any(len(k.key) != KEY_BYTES for k in keks) or len(ring.index_key) != KEY_BYTES:
        raise ConfigError(f"key ring {path} holds a key of the wrong length")
    ring.get(ring.active_id)
    return ring


_latest: dict[Path, KeyRing] = {}  # per file: the newest version read by :func:`newer` in this process
READ_LOCK_WAIT_S = 5.0


def newer(ring: KeyRing) -> KeyRing | None:
    """The key ring file as it is now, when it changed since ``ring`` was loaded; None when it did not,
    when ``ring`` has no file, or when the file now fails to load (the caller then reports the key it
    was missing). A file with another blind-index key is refused: it is another installation's ring.

    Running roles kept the ring they loaded at start, so after ``keys rotate`` re-wrapped every data
    key under the new KEK, each blob read raised KeyNotFound until a restart (dead-lettered results,
    failed jobs). Callers re-read the file once on a missing KEK id; an unchanged file costs a stat."""
    path = ring.path
    if path is None:
        return None
    try:
        now = _stamp(path)
        if now == ring.stamp:
            return None
        cached = _latest.get(path)
        if cached is not None and cached.stamp == now:
            return cached
        with _read_lock(path):
            fresh = load(path)
    except (OSError, ConfigError) as exc:
        log.warning("key ring not re-read", extra={"reason": type(exc).__name__})
        return None
    if fresh.index_key != ring.index_key:
        log.error("key ring file now holds another blind-index key: not used until a restart",
                  extra={"kek_id": fresh.active_id})
        return None
    _latest[path] = fresh
    log.info("key ring re-read", extra={"kek_id": fresh.active_id})
    return fresh


@contextmanager
def _read_lock(path: Path) -> Iterator[None]:
    """A shared hold of the key ring's lock for a re-read, waiting at most READ_LOCK_WAIT_S for a key
    command in progress. Saves rename a complete file into place, so a read without the lock (no lock
    file, a read-only secret mount, a file system without locks, a long ``keys retire``) still sees a
    whole key ring: waiting longer could stall a role's transaction behind a key command."""
    try:
        fd = os.open(path.parent / f".{path.name}.lock", os.O_RDONLY)
    except OSError:
        yield
        return
    held = False
    try:
        deadline = time.monotonic() + READ_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                held = True
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        yield
    finally:
        if held:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the key ring's exclusive lock (``flock`` on a file beside it) around a load-change-save, so
    two commands (``keys rotate`` and ``keys retire``, or two first starts) cannot overwrite each
    other's change: a lost update could drop the active KEK and orphan everything wrapped under it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    locked_here = True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            locked_here = False  # some network file systems have no locks: run key commands one at a time
            log.warning("key ring lock unavailable on this file system; run key commands one at a time",
                        extra={"reason": errno.errorcode.get(exc.errno or 0, "")})
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # a crashed save's copy of the key ring
            stale.unlink(missing_ok=True)
        yield
    finally:
        if locked_here:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def init(path: Path, *, exist_ok: bool = False) -> KeyRing:
    """Create a new key ring; refuse to overwrite an existing one (that would orphan every blob). With
    ``exist_ok`` (a first start racing another), load the one that exists instead."""
    with locked(path):
        if path.exists():
            if exist_ok:
                return load(path)
            raise ConfigError(f"a key ring already exists at {path}; use `msgate keys rotate`")
        ring = generate()
        save(ring, path)
    return KeyRing(keks=ring.keks, active_id=ring.active_id, index_key=ring.index_key, path=path)
