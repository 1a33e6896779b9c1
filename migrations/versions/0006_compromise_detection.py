"""compromise detection: per-user settings, held mail, provider-wide settings

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 00:10:00

"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

USER_COLUMNS = [
    ('compromise_detection', sa.Boolean(), sa.true()),
    ('detection_shadow_mode', sa.Boolean(), sa.true()),
    ('detection_throttle_at', sa.Integer(), '60'),
    ('detection_hold_at', sa.Integer(), '120'),
    ('detection_lock_at', sa.Integer(), '400'),
    ('detection_throttle_rate', sa.Integer(), '10'),
    ('detection_new_sender_allowance', sa.Integer(), '20'),
    ('detection_release_pace', sa.Integer(), '30'),
]


# Plain ALTER TABLE and CREATE TABLE (no batch mode): SQLite's batch mode would copy and drop
# outgoing_users, and the drop cascades to identities and headers.
def upgrade():
    for name, type_, default in USER_COLUMNS:
        op.add_column('outgoing_users', sa.Column(name, type_, nullable=False,
                                                  server_default=default))
    op.create_table(
        'held_messages',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('domain_id', sa.Integer(), sa.ForeignKey('domains.id', ondelete='CASCADE'),
                  nullable=False),
        sa.Column('user_id', sa.Integer(),
                  sa.ForeignKey('outgoing_users.id', ondelete='SET NULL'), nullable=True),
        sa.Column('mail_from', sa.String(length=320), nullable=False),
        sa.Column('rcpt_tos', sa.Text(), nullable=False),
        sa.Column('subject', sa.String(length=500), nullable=False),
        sa.Column('size', sa.Integer(), nullable=False),
        sa.Column('storage_key', sa.String(length=200), nullable=False),
        sa.Column('body', sa.LargeBinary(), nullable=True),
        sa.Column('received_at', sa.DateTime(), nullable=False),
        sa.Column('identity', sa.String(length=255), nullable=True),
        sa.Column('client_ip', sa.String(length=45), nullable=True),
        sa.Column('risk', sa.Float(), nullable=False),
        sa.Column('signals', sa.Text(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('queued_at', sa.DateTime(), nullable=True),
        sa.Column('claim', sa.String(length=32), nullable=True),
        sa.Column('claimed_at', sa.DateTime(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('released_at', sa.DateTime(), nullable=True),
        sa.Column('last_error', sa.String(length=500), nullable=True),
    )
    op.create_index('ix_held_messages_user_id', 'held_messages', ['user_id'])
    op.create_index('ix_held_messages_state', 'held_messages', ['state'])
    op.create_index('ix_held_messages_received_at', 'held_messages', ['received_at'])
    op.create_table(
        'global_settings',
        sa.Column('name', sa.String(length=64), primary_key=True),
        sa.Column('value', sa.String(length=500), nullable=False),
    )


def downgrade():
    op.drop_table('global_settings')
    op.drop_index('ix_held_messages_received_at', table_name='held_messages')
    op.drop_index('ix_held_messages_state', table_name='held_messages')
    op.drop_index('ix_held_messages_user_id', table_name='held_messages')
    op.drop_table('held_messages')
    for name, _, _ in reversed(USER_COLUMNS):
        op.execute(f"ALTER TABLE outgoing_users DROP COLUMN {name}")
