"""outbox_attempt.peer_text_enc: the interface engine's explanation of an AR/AE (MSA-3, ERR-8), encrypted

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-09
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Attempts recorded before this revision kept no engine text: NULL.
    with op.batch_alter_table("outbox_attempt") as batch:
        batch.add_column(sa.Column("peer_text_enc", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox_attempt") as batch:
        batch.drop_column("peer_text_enc")
