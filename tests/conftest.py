"""Shared fixtures: fresh homes, and the storage matrix (embedded SQLite + local blobs, and the
machine's real PostgreSQL with PostgreSQL blobs). Each PostgreSQL test gets its own database."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from msgate.config import Settings, load_settings
from msgate.storage.store import Store, open_store

PG_ADMIN = os.environ.get("MSGATE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
# One Redis database per pytest-xdist worker (gw0: 15, gw1: 14, ...): Celery's own keys (unacked
# messages, bindings) are per database, and parallel test files must not restore each other's messages.
XDIST_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
REDIS_URL = os.environ.get("MSGATE_TEST_REDIS", f"redis://127.0.0.1:6379/{15 - XDIST_WORKER}")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the machine's server, dropped afterwards."""
    name = f"msgate_t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_settings(home: Path, backend: str, pg: str | None = None, **extra: object) -> Settings:
    storage = {"min_free_bytes": 0, "purge_free_bytes": 0, **extra.pop("storage", {})}  # type: ignore[dict-item]
    if backend == "postgres":
        assert pg is not None
        return load_settings(home=home, database_url=pg, storage={**storage, "blob_backend": "postgres"}, **extra)
    return load_settings(home=home, storage=storage, **extra)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Settings:
    pg = request.getfixturevalue("pg_url") if backend == "postgres" else None
    home = tmp_path / "home"
    if backend == "postgres":
        from msgate.storage import keyring

        keyring.init(home / "keys" / "keyring.json")
    return make_settings(home, backend, pg)


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    st = open_store(settings)
    yield st
    st.close()


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs the whole CLI (``msgate.cli.app``) installs msgate's log handler on the root logger,
    on CliRunner's stream, which is closed once the test ends; later tests in the same process then print
    "--- Logging error ---" into whatever stream is current (another CliRunner's output). Put the root
    logger's msgate handlers and level back after each test."""
    root = logging.getLogger()
    before, level = [h for h in root.handlers if getattr(h, "_msgate", False)], root.level
    yield
    for handler in [h for h in root.handlers if getattr(h, "_msgate", False)]:
        if handler not in before:  # msgate's own handlers only: pytest's capture handlers come and go per phase
            root.removeHandler(handler)
    for handler in before:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
