"""instance.change_hash: a study re-sent in another transfer syntax keeps its identity in the change check

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance") as batch:
        batch.add_column(sa.Column("change_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    # Versions received before this revision were never compared: each is a change, as the check counted it.
    op.execute("UPDATE instance SET change_hash = content_hash WHERE version > 1")


def downgrade() -> None:
    with op.batch_alter_table("instance") as batch:
        batch.drop_column("change_hash")
