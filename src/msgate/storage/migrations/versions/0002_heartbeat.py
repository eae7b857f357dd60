"""heartbeat table for role health (msgate status)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

import msgate.storage.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "heartbeat",
        sa.Column("role", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("instance", sqlmodel.sql.sqltypes.AutoString(length=96), nullable=False),
        sa.Column("started_at", msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("beat_at", msgate.storage.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("role", "instance"),
    )


def downgrade() -> None:
    op.drop_table("heartbeat")
