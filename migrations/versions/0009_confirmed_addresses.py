"""confirmed_addresses: outside addresses a domain's notices may go to

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 07:30:00

From now on a domain admin's Abuse report address or Contact email outside the domain gets
abuse reports, alerts and lock notices only once someone there has confirmed it
(``outgoing.notify_addresses``). Addresses set before this version are taken as confirmed, so
an upgrade does not silently stop the notices an operator relies on. The address rule
(trimmed, lower-case, the domain in IDNA form) is copied here, not imported: a migration must
not change when the code does.
"""
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def address_key(address: str) -> str:
    local, at, domain = address.strip().rpartition("@")
    if not at:
        return address.strip().lower()
    try:
        domain = domain.strip().rstrip(".").lower().encode("idna").decode("ascii")
    except UnicodeError:
        pass
    return f"{local}@{domain}".lower()


def upgrade():
    table = op.create_table(
        'confirmed_addresses',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('domain_id', sa.Integer(), nullable=False),
        sa.Column('address', sa.String(length=320), nullable=False),
        sa.Column('confirmed_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['domain_id'], ['domains.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('domain_id', 'address'),
    )
    conn = op.get_bind()
    domains = sa.table("domains", sa.column("id", sa.Integer),
                       sa.column("abuse_report_address", sa.String))
    users = sa.table("outgoing_users", sa.column("domain_id", sa.Integer),
                     sa.column("contact_email", sa.String), sa.column("name", sa.String))
    wanted: set[tuple[int, str]] = set()
    for domain_id, address in conn.execute(sa.select(domains.c.id,
                                                     domains.c.abuse_report_address)):
        if address and address.strip():
            wanted.add((domain_id, address_key(address)[:320]))
    for domain_id, contact, name in conn.execute(sa.select(users.c.domain_id,
                                                           users.c.contact_email,
                                                           users.c.name)):
        for value in (contact, name):
            if value and "@" in value and not any(c.isspace() for c in value):
                wanted.add((domain_id, address_key(value)[:320]))
    now = datetime.now(UTC).replace(tzinfo=None)
    if wanted:
        conn.execute(sa.insert(table), [{"domain_id": d, "address": a, "confirmed_at": now}
                                        for d, a in sorted(wanted)])


def downgrade():
    op.drop_table('confirmed_addresses')
