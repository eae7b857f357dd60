"""Builds the storage services from Settings: database, key ring, field cipher, blobs, ingest.

The key ring is required. In embedded mode (SQLite) on a brand-new home, ``open_store`` creates one
(with a warning) so the quick start works; in production (PostgreSQL) run ``msgate keys init`` first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import text

from msgate.config import Settings
from msgate.errors import ConfigError
from msgate.storage import audit, crypto, keyring
from msgate.storage.blobs import Blobs, make_bodies
from msgate.storage.crypto import FieldCipher
from msgate.storage.db import Database
from msgate.storage.ingest import Ingest
from msgate.storage.models import DataKey, new_id

log = logging.getLogger(__name__)


@dataclass
class Store:
    settings: Settings
    db: Database
    ring: keyring.KeyRing
    cipher: FieldCipher
    blobs: Blobs
    ingest: Ingest

    def __post_init__(self) -> None:
        self.blobs.on_new_ring = self._use_ring

    def _use_ring(self, ring: keyring.KeyRing) -> None:
        """The key ring file re-read by a blob read that met a KEK this process had not loaded (a
        ``keys rotate`` since it started): the store and its field cipher use it from now on too."""
        self.ring = self.cipher.ring = ring

    def close(self) -> None:
        self.db.dispose()


def load_or_create_ring(settings: Settings, *, create: bool) -> keyring.KeyRing:
    path = settings.keyring_path
    if not path.exists():
        fresh_home = not (settings.home / "msgate.db").exists() and not settings.blob_dir.exists()
        if create and settings.is_embedded and fresh_home:
            log.warning("no key ring found: created a new one (embedded mode); back it up", extra={"role": "keys"})
            return keyring.init(path, exist_ok=True)  # another process may be starting at the same moment
        raise ConfigError(f"no key ring at {path}; run `msgate keys init`")
    return keyring.load(path)


FIELD_KEY_LOCK = 0x6D736761_7465_01  # pg_advisory_xact_lock key of the field key's creation ("msgate" 1)


def field_cipher(db: Database, ring: keyring.KeyRing) -> FieldCipher:
    """Load (or on first use create) the PHI field key, wrapped by the active KEK in ``data_key``. Its
    creation is serialised (PostgreSQL: an advisory lock; SQLite: the write lock every transaction takes):
    roles starting together on a fresh database each made their own key, and could not read each other's
    PHI columns."""
    from sqlmodel import col, select

    with db.session() as session:
        if not db.is_sqlite:  # every role starts at once on a fresh database: one of them makes the key
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": FIELD_KEY_LOCK})
        rows = session.exec(select(DataKey).where(DataKey.purpose == "field").order_by(col(DataKey.created_at))).all()
        if not rows:
            key_id = new_id()
            plain, wrapped = crypto.new_data_key(ring, blob_id=key_id, kind="field")
            session.add(DataKey(id=key_id, purpose="field", kek_id=wrapped.kek_id, wrapped=wrapped.wrapped))
            return FieldCipher(ring, {key_id: plain}, key_id)
        keys = {row.id: crypto.unwrap_key(ring, crypto.WrappedKey(row.kek_id, row.wrapped), blob_id=row.id,
                                          kind="field") for row in rows}
        return FieldCipher(ring, keys, rows[-1].id)


def open_store(settings: Settings, *, migrate: bool = True, create_keys: bool = True) -> Store:
    """Open (and on first start migrate) the store described by ``settings``. Its engine carries the audit
    key, and migrating keys an audit chain written before the chain was keyed."""
    settings.home.mkdir(parents=True, exist_ok=True)
    ring = load_or_create_ring(settings, create=create_keys)
    db = Database(settings.resolved_database_url)
    audit_key = audit.chain_key(ring.index_key)
    audit.use_key(db.engine, audit_key)  # every append on this engine is keyed, with no key in the call
    if migrate:
        db.upgrade(audit_key=audit_key)
    cipher = field_cipher(db, ring)
    if settings.storage.blob_backend == "postgres" and db.is_sqlite:
        raise ConfigError("MSGATE_STORAGE__BLOB_BACKEND=postgres needs MSGATE_DATABASE_URL=postgresql+psycopg://...")
    bodies = make_bodies(settings.storage.blob_backend, settings.blob_dir)
    blobs = Blobs(db=db, ring=ring, bodies=bodies, chunk_bytes=settings.storage.chunk_bytes)
    ingest = Ingest(db=db, blobs=blobs, cipher=cipher, min_free_bytes=settings.storage.min_free_bytes,
                    space_path=settings.blob_dir if settings.storage.blob_backend == "local" else settings.home,
                    default_issuer=settings.dicom.default_issuer)
    return Store(settings=settings, db=db, ring=ring, cipher=cipher, blobs=blobs, ingest=ingest)
