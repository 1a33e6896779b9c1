"""SQLite tables never give an id twice (AUTOINCREMENT)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 09:00:00

Ids travel outside their rows: in links, in RQ jobs (a release carries a quarantined
message's id), in markers and digests. SQLite without AUTOINCREMENT gives the id of a deleted
highest row to the next row, so a late job or an old link could act on another customer's
row. SQLite cannot add AUTOINCREMENT to a table, so each table with an id is rebuilt (rows
kept, and the next id counted on from the highest kept). ``migrations/env.py`` turns foreign
keys off around the run, so dropping the old table cascades into nothing. PostgreSQL's
sequences never go back: nothing to do there. The list is written out, not read from the
models: a migration must not change when the code does.
"""
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

TABLES = ("domains", "admins", "lock_templates", "outgoing_users", "identification_headers",
          "identities", "dkim_keys", "quarantined_messages", "held_messages",
          "archived_messages", "audit_events", "confirmed_addresses", "message_log")


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for name in TABLES:
        with op.batch_alter_table(name, recreate="always",
                                  table_kwargs={"sqlite_autoincrement": autoincrement}):
            pass


def upgrade():
    _rebuild(True)


def downgrade():
    _rebuild(False)
