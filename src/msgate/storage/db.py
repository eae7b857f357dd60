"""Engine and sessions for SQLite (embedded, WAL) and PostgreSQL; migrations with alembic.

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is on disk when it returns) and
``BEGIN IMMEDIATE`` transactions, so concurrent writers queue on the busy timeout instead of failing.
PostgreSQL connections have a connect timeout and TCP keepalives: without them a database host that
stops answering (a hung server, a firewall dropping packets) blocked every call, ``pool_pre_ping``
included, forever (libpq connection parameters, PostgreSQL docs §34.1.2).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, make_url, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlmodel import Session

from msgate.errors import DatabaseUnavailable, Transient

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x6D736761_7465_02  # pg_advisory_xact_lock key of schema migrations ("msgate" 2)


def _sqlite_engine(url: str) -> Engine:
    path = url.split("sqlite:///", 1)[1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=8,
                           max_overflow=16)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" hook issue BEGIN IMMEDIATE
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _postgres_engine(url: str, connect_timeout: int, statement_timeout_ms: int | None) -> Engine:
    """Timeouts and keepalives as defaults: what the URL's query already sets wins (``connect_args``
    would override it: an operator's ``connect_timeout=30`` or ``options=-csearch_path=...`` was lost),
    and the statement timeout is added to the URL's ``options`` rather than replacing them."""
    query = dict(make_url(url).query)
    defaults: dict[str, Any] = {"connect_timeout": connect_timeout, "keepalives": 1, "keepalives_idle": 30,
                                "keepalives_interval": 10, "keepalives_count": 3}
    args = {key: value for key, value in defaults.items() if key not in query}
    if statement_timeout_ms is not None:
        given = query.get("options")
        given = " ".join(given) if isinstance(given, tuple) else (given or "")
        args["options"] = f"{given} -c statement_timeout={statement_timeout_ms}".strip()
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=30,
                         connect_args=args)


def masked(url: str) -> str:
    """The URL with its password replaced by ``***``, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(an unparsable database URL)"


class Database:
    """One engine per process; ``session()`` yields a transaction-scoped sqlmodel Session.

    ``connect_timeout`` (seconds, libpq's minimum is 2) and ``statement_timeout_ms`` apply to PostgreSQL
    only; ``msgate status`` sets both low so a health check answers in bounded time.
    """

    def __init__(self, url: str, *, connect_timeout: int = 10,
                 statement_timeout_ms: int | None = None) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.engine = _sqlite_engine(url)
        else:
            self.engine = _postgres_engine(url, connect_timeout, statement_timeout_ms)

    def connect(self) -> Connection:
        """A connection; a database that cannot be reached raises :class:`DatabaseUnavailable` naming it."""
        try:
            return self.engine.connect()
        except OperationalError as exc:
            said = str(exc.orig).strip()  # libpq's connection message: host, port, user; never SQL
            reason = said.splitlines()[0][:200] if said else type(exc.orig).__name__
            raise DatabaseUnavailable(f"cannot connect to the database at {masked(self.url)}: {reason}") from exc

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error; DB outages become Transient."""
        session = Session(self.engine, expire_on_commit=False)
        try:
            yield session
            session.commit()
        except OperationalError as exc:
            session.rollback()
            raise Transient(f"database unavailable ({type(exc.orig).__name__})", code="db_unavailable") from None
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def ping(self) -> bool:
        try:
            with self.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except (OperationalError, DatabaseUnavailable):
            return False

    def upgrade(self, revision: str = "head", *, audit_key: bytes | None = None) -> None:
        """Run alembic migrations up to ``revision`` (``msgate db upgrade``, and on first start). Revision
        0007 keys the audit chain and needs the audit key: ``audit_key``, else the one bound to this engine
        (``audit.use_key``, as ``open_store`` does)."""
        from alembic import command
        from alembic.config import Config

        from msgate.storage import audit

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["audit_key"] = audit_key or audit.key_of(self.engine)
        with self.connect() as conn, conn.begin():
            if not self.is_sqlite:  # roles started together on PostgreSQL: one migrates, the others then
                # find it done (they raced to create the same tables: "unexpected IntegrityError", exit 1)
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def dispose(self) -> None:
        self.engine.dispose()
