"""outgoing users: shared smarthost (re-authentication across domains, super admins only)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 23:40:00

"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


# Plain ALTER TABLE, not batch mode: on SQLite batch mode copies and drops outgoing_users,
# and the drop cascades to every row that references it (identities, quarantine, ...).
def upgrade():
    op.add_column('outgoing_users', sa.Column('shared_smarthost', sa.Boolean(),
                                              nullable=False, server_default=sa.false()))


def downgrade():
    op.execute("ALTER TABLE outgoing_users DROP COLUMN shared_smarthost")
