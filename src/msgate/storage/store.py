"""Builds the storage services from Settings: database, key ring, field cipher, blobs, ingest.

The key ring is required. In embedded mode (SQLite) on a brand-new home, ``open_store`` creates one
(with a warning) so the quick start works; in production (PostgreSQL) run ``msgate keys init`` first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from msgate.config import Settings
from msgate.errors import ConfigError
from msgate.storage import keyring
from msgate.storage.blobs import Blobs, make_bodies
from msgate.storage.crypto import FieldCipher
from msgate.storage.db import Database
from msgate.storage.ingest import Ingest

log = logging.getLogger(__name__)


@dataclass
class Store:
    settings: Settings
    db: Database
    ring: keyring.KeyRing
    cipher: FieldCipher
    blobs: Blobs
    ingest: Ingest

    def close(self) -> None:
        self.db.dispose()


def load_or_create_ring(settings: Settings, *, create: bool) -> keyring.KeyRing:
    path = settings.keyring_path
    if not path.exists():
        fresh_home = not (settings.home / "msgate.db").exists() and not settings.blob_dir.exists()
        if create and settings.is_embedded and fresh_home:
            log.warning("no key ring found: created a new one (embedded mode); back it up", extra={"role": "keys"})
            return keyring.init(path)
        raise ConfigError(f"no key ring at {path}; run `msgate keys init`")
    return keyring.load(path)


def open_store(settings: Settings, *, migrate: bool = True, create_keys: bool = True) -> Store:
    """Open (and on first start migrate) the store described by ``settings``."""
    settings.home.mkdir(parents=True, exist_ok=True)
    ring = load_or_create_ring(settings, create=create_keys)
    db = Database(settings.resolved_database_url)
    if migrate:
        db.upgrade()
    cipher = FieldCipher(ring)
    if settings.storage.blob_backend == "postgres" and db.is_sqlite:
        raise ConfigError("MSGATE_STORAGE__BLOB_BACKEND=postgres needs MSGATE_DATABASE_URL=postgresql+psycopg://...")
    bodies = make_bodies(settings.storage.blob_backend, settings.blob_dir)
    blobs = Blobs(db=db, ring=ring, bodies=bodies, chunk_bytes=settings.storage.chunk_bytes)
    ingest = Ingest(db=db, blobs=blobs, cipher=cipher, min_free_bytes=settings.storage.min_free_bytes,
                    space_path=settings.blob_dir if settings.storage.blob_backend == "local" else settings.home)
    return Store(settings=settings, db=db, ring=ring, cipher=cipher, blobs=blobs, ingest=ingest)
