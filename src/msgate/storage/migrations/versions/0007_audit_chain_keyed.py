"""The audit chain is keyed from this revision on: a chain written before it gets its audit.keyed record

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

No schema change. The keying is a migration so that it happens once, in the upgrade's transaction: a
database at this revision or later whose chain has no keyed part was stripped of it, and no later start
keys it again (``msgate audit verify`` keeps failing). The key comes from the key ring, which msgate's
``db upgrade`` and ``serve`` pass in (``Database.upgrade``); without it this revision refuses to run on
a chain that has records (an empty one needs no key: its first record is keyed when it is written).
"""

from alembic import context, op
from sqlmodel import Session

from msgate.errors import ConfigError

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from msgate.storage import audit

    key = context.config.attributes.get("audit_key")
    session = Session(bind=op.get_bind())
    try:
        if key is None and _empty(session):  # a new database: its first record will be keyed (no key needed now)
            return
        if key is None:
            raise ConfigError("revision 0007 keys the audit chain and needs the key ring: run `msgate db upgrade` "
                              "or `msgate serve` with MSGATE_KEYRING_FILE (or MSGATE_HOME/keys) readable",
                              code="audit_key_missing")
        audit.key_chain(session, key)
        session.flush()
    finally:
        session.close()


def _empty(session: Session) -> bool:
    from msgate.storage.models import AuditHead

    head = session.get(AuditHead, 1)
    return head is None or head.seq == 0


def downgrade() -> None:
    """The audit.keyed record stays: a chain is not unkeyed (upgrading again finds it keyed)."""
