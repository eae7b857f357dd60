"""observation.sub_id (OBX-4): repeated results of one code are corrected one by one

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("observation") as batch:
        batch.add_column(sa.Column("sub_id", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False,
                                   server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("observation") as batch:
        batch.drop_column("sub_id")
