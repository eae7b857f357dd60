"""series.frame_count: a 3D FLAIR sent as one multi-frame instance counts its frames, not 1

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("frame_count", sa.Integer(), nullable=False, server_default="0"))
    # Series indexed before this revision: one frame per instance (what the series choice assumed).
    op.execute("UPDATE series SET frame_count = instance_count")


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.drop_column("frame_count")
