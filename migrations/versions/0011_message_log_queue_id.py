"""Log Search finds a transaction by our queue id

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 19:00:00

The queue id is what a relayed message carries of us (``Received: ... id 3F2A9C01B7``), so
it is what a customer quotes from a message's headers or a bounce. Log Search filters by it
through this index (on PostgreSQL the partitioned table's index is each day's partition's).
"""
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade():
    op.execute("CREATE INDEX ix_message_log_queue_id ON message_log (queue_id)")


def downgrade():
    op.execute("DROP INDEX ix_message_log_queue_id")
