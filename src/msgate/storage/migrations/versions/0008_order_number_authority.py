"""order_.placer_authority_enc, filler_authority_enc: each order number's namespace (EI.2-EI.4), encrypted

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-10
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Orders stored before this revision kept only EI.1: NULL, and their ORU carries the number alone.
    with op.batch_alter_table("order_") as batch:
        batch.add_column(sa.Column("placer_authority_enc", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("filler_authority_enc", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("order_") as batch:
        batch.drop_column("filler_authority_enc")
        batch.drop_column("placer_authority_enc")
