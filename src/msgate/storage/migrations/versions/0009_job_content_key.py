"""job.content_key, job.planned_ready_at: a content that comes back after a correction runs again

``idem_key`` stays unique but now combines the content key with the job it supersedes (one job per content
per place in the study's chain); the content itself moves to ``content_key``, which may repeat. Before this
revision the unique content key blocked a case whose data went back to an earlier state (an A08 reverted, a
lab value withdrawn) from ever running again.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-11
"""

import hashlib

import sqlalchemy as sa
import sqlmodel
from alembic import op

import msgate.storage.models

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job") as batch:  # add_column only: ALTER TABLE, no copy, on SQLite too
        batch.add_column(sa.Column("content_key", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch.add_column(sa.Column("planned_ready_at", msgate.storage.models.UtcDateTime(timezone=True),
                                   nullable=True))
    # Jobs created before this revision were keyed by their content alone.
    op.execute("UPDATE job SET content_key = idem_key")


def downgrade() -> None:
    # The older code finds a content by ``idem_key`` alone: each content's newest job gets its content key
    # back, so the older code does nothing for the data the newest job already ran on. A job created before
    # this revision that holds that key (the content came back after a correction) takes a chained key.
    conn = op.get_bind()
    job = sa.table("job", sa.column("id"), sa.column("idem_key"), sa.column("content_key"),
                   sa.column("supersedes_id"), sa.column("created_at"))
    chained = conn.execute(sa.select(job.c.id, job.c.content_key)
                           .where(job.c.content_key.is_not(None), job.c.content_key != job.c.idem_key)
                           .order_by(job.c.created_at.desc(), job.c.id)).all()
    given: set[str] = set()
    for job_id, content in chained:  # jobs created since this revision only, newest first
        if content in given:
            continue
        holder = conn.execute(sa.select(job.c.id, job.c.supersedes_id).where(job.c.idem_key == content)).first()
        if holder is not None:
            aside = hashlib.sha256(f"{content}|{holder.supersedes_id or ''}".encode()).hexdigest()
            conn.execute(sa.update(job).where(job.c.id == holder.id).values(idem_key=aside))
        conn.execute(sa.update(job).where(job.c.id == job_id).values(idem_key=content))
        given.add(content)
    # Native DROP COLUMN (SQLite 3.35+): a batch copy of ``job`` would drop the table that results and
    # outbox entries reference, with foreign keys on.
    op.drop_column("job", "planned_ready_at")
    op.drop_column("job", "content_key")
