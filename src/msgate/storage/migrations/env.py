"""Alembic environment: runs on the connection msgate passes in (see storage.db.Database.upgrade)."""

from alembic import context
from sqlmodel import SQLModel

import msgate.storage.models  # noqa: F401  (registers the tables)

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `msgate db upgrade`")
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
