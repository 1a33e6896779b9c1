"""admins: a session generation, so logging out or a new password ends old sessions

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 23:00:00

"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


# Plain ALTER TABLE (no batch mode), as 0006: a batch copy of admins is not needed to add one.
def upgrade():
    op.add_column('admins', sa.Column('session_generation', sa.Integer(), nullable=False,
                                      server_default='0'))


def downgrade():
    op.execute("ALTER TABLE admins DROP COLUMN session_generation")
