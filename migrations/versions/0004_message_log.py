"""message log: one row per SMTP transaction (on PostgreSQL partitioned by day)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 00:00:00

"""
from datetime import UTC, datetime, timedelta

from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

COLUMNS = """
    id BIGSERIAL NOT NULL,
    at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    stream_id VARCHAR(32) NOT NULL,
    stage VARCHAR(16) NOT NULL,
    verdict VARCHAR(16) NOT NULL,
    client_ip VARCHAR(45),
    domain_id INTEGER,
    user_id INTEGER,
    user_name VARCHAR(320),
    login VARCHAR(320),
    identity VARCHAR(320),
    mail_from VARCHAR(320),
    rcpt_count INTEGER NOT NULL,
    refused_count INTEGER NOT NULL,
    recipients TEXT,
    message_id VARCHAR(320),
    subject VARCHAR(300),
    size INTEGER,
    score FLOAT,
    rules TEXT,
    reply VARCHAR(512),
    next_hop_reply VARCHAR(512),
    queue_id VARCHAR(32),
    relay_seconds FLOAT,
    stored_kind VARCHAR(16),
    stored_id INTEGER
"""

INDEXES = [
    ("ix_message_log_at", "at, id", False),
    ("ix_message_log_domain_at", "domain_id, at, id", False),
    ("ix_message_log_sender_at", "mail_from, at, id", False),
    ("ix_message_log_user_at", "user_id, at, id", False),
    ("ix_message_log_message_id", "message_id", False),
    # On a partitioned table a unique index must hold the partition key: a stream entry
    # always carries the same time, so (stream_id, at) is as unique as stream_id.
    ("uq_message_log_stream_id", "stream_id, at", True),
]


def upgrade():
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        # Partitioned by day: retention drops a whole day at once instead of deleting rows.
        # The primary key must include the partition key too.
        op.execute(f"CREATE TABLE message_log ({COLUMNS}, PRIMARY KEY (id, at)) "
                   "PARTITION BY RANGE (at)")
        today = datetime.now(UTC).date()
        for offset in range(-1, 4):  # the worker keeps creating them ahead
            day = today + timedelta(days=offset)
            op.execute(f"CREATE TABLE IF NOT EXISTS message_log_{day:%Y%m%d} PARTITION OF "
                       f"message_log FOR VALUES FROM ('{day}') TO "
                       f"('{day + timedelta(days=1)}')")
    else:
        columns = COLUMNS.replace("id BIGSERIAL NOT NULL", "id INTEGER NOT NULL").replace(
            "TIMESTAMP WITHOUT TIME ZONE", "DATETIME")
        op.execute(f"CREATE TABLE message_log ({columns}, PRIMARY KEY (id))")
    for name, columns, unique in INDEXES:
        op.execute(f"CREATE {'UNIQUE ' if unique else ''}INDEX {name} ON message_log "
                   f"({columns})")


def downgrade():
    op.execute("DROP TABLE message_log")  # its partitions go with it
