"""identities carry their user's domain, for a domain's identities in index order

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 08:20:00

"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('identities', schema=None) as batch_op:
        batch_op.add_column(sa.Column('domain_id', sa.Integer(), nullable=True))
    op.execute("UPDATE identities SET domain_id = (SELECT outgoing_users.domain_id "
               "FROM outgoing_users WHERE outgoing_users.id = identities.user_id)")
    with op.batch_alter_table('identities', schema=None) as batch_op:
        batch_op.alter_column('domain_id', existing_type=sa.Integer(), nullable=False)
        batch_op.create_foreign_key('fk_identities_domain_id', 'domains', ['domain_id'], ['id'],
                                    ondelete='CASCADE')
        batch_op.create_index('ix_identities_domain_value', ['domain_id', 'value', 'id'],
                              unique=False)


def downgrade():
    with op.batch_alter_table('identities', schema=None) as batch_op:
        batch_op.drop_index('ix_identities_domain_value')
        batch_op.drop_constraint('fk_identities_domain_id', type_='foreignkey')
        batch_op.drop_column('domain_id')
