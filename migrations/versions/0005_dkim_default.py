"""dkim keys: the result of the last "Check DNS" (the default selector signs once published)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 00:10:00

"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


# Plain ALTER TABLE (no batch mode): SQLite's batch mode would copy and drop the table.
def upgrade():
    op.add_column('dkim_keys', sa.Column('dns_checked_at', sa.DateTime(), nullable=True))
    op.add_column('dkim_keys', sa.Column('dns_published', sa.Boolean(), nullable=False,
                                         server_default=sa.false()))
    op.add_column('dkim_keys', sa.Column('dns_problem', sa.String(length=300), nullable=True))


def downgrade():
    for column in ('dns_problem', 'dns_published', 'dns_checked_at'):
        op.execute(f"ALTER TABLE dkim_keys DROP COLUMN {column}")
