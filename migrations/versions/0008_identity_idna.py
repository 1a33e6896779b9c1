"""identities: a domain spelled in Unicode is stored in its A-label form

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 05:15:00

The proxy now spells an identity's domain in IDNA A-label form (``scoring.address``), so
``bob@bücher.example`` and ``bob@xn--bcher-kva.example`` are one identity. Rows stored under
the Unicode spelling are renamed to it; where the user has both, the two are merged (counts
added, the earlier first and later last sight kept, and the lock of whichever is locked), so
a lock is never lost. Held and quarantined messages are keyed by identity too (the automatic
release skips a locked identity's held mail; releases go by identity): theirs are renamed
the same way. The message log keeps the spelling it recorded. The proxy writes the database's locks back into Redis when it starts,
under the new spelling. The rule is copied here, not imported: a migration must not change
when the code does.
"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

LOCK_COLUMNS = ("locked", "lock_kind", "lock_reason", "locked_at", "lock_id",
                "automatic_unlocks_used")


def a_label(value: str) -> str | None:
    """The identity with its domain in A-label form, or None when that changes nothing."""
    local, at, domain = value.rpartition("@")
    if not at or not local or domain.isascii():
        return None
    try:
        spelled = f"{local}@{domain.encode('idna').decode('ascii').lower()}"
    except UnicodeError:
        return None
    return spelled[:255] if spelled != value else None


def _either(pick, one, other):
    return pick(one, other) if one and other else (one or other)


def upgrade():
    conn = op.get_bind()
    identities = sa.table(
        "identities", sa.column("id", sa.Integer), sa.column("user_id", sa.Integer),
        sa.column("value", sa.String), sa.column("message_count", sa.Integer),
        sa.column("spam_count", sa.Integer), sa.column("first_seen", sa.DateTime),
        sa.column("last_seen", sa.DateTime),
        *(sa.column(name) for name in LOCK_COLUMNS))
    rows = conn.execute(sa.select(identities)).mappings().all()
    wanted = {(row["user_id"], row["value"]): row for row in rows}
    for row in rows:
        value = a_label(row["value"])
        if value is None:
            continue
        kept = wanted.get((row["user_id"], value))
        if kept is None:
            conn.execute(identities.update().where(identities.c.id == row["id"])
                         .values(value=value))
            wanted[(row["user_id"], value)] = {**row, "value": value}
            continue
        merged = {
            "message_count": (kept["message_count"] or 0) + (row["message_count"] or 0),
            "spam_count": (kept["spam_count"] or 0) + (row["spam_count"] or 0),
            "first_seen": _either(min, kept["first_seen"], row["first_seen"]),
            "last_seen": _either(max, kept["last_seen"], row["last_seen"]),
        }
        if row["locked"] and not kept["locked"]:
            merged.update({name: row[name] for name in LOCK_COLUMNS})
        conn.execute(identities.update().where(identities.c.id == kept["id"]).values(**merged))
        conn.execute(identities.delete().where(identities.c.id == row["id"]))
        wanted[(row["user_id"], value)] = {**kept, **merged}

    for name in ("held_messages", "quarantined_messages"):
        stored = sa.table(name, sa.column("identity", sa.String))
        for (value,) in conn.execute(sa.select(stored.c.identity).distinct()).all():
            spelled = a_label(value) if value else None
            if spelled is not None:
                conn.execute(stored.update().where(stored.c.identity == value)
                             .values(identity=spelled))


def downgrade():
    pass  # the Unicode spelling is not kept: both name one mailbox
