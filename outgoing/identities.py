"""Identities in the database: created on first sight, with message and spam counts.

The proxy counts per message in Redis and writes here in batches (``record_counts``), so no
message waits for the database. The upsert is one statement per batch and adds to whatever
another proxy instance wrote, so instances never overwrite each other's counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from outgoing.models import Identity, OutgoingUser
from scoring.identity import MAX_IDENTITY, normalise_identity

Counts = Mapping[str, tuple[int, int]]  # identity -> (messages, spam)
BATCH = 200  # rows per statement, well inside every database's bound-parameter limit


def _insert(session):
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(Identity)
    if dialect == "sqlite":
        return sqlite.insert(Identity)
    raise RuntimeError(f"no identity upsert for the {dialect} database")


def record_counts(session, user_id: int, counts: Counts, now: datetime) -> int:
    """Add ``counts`` to the user's identities, creating the ones not seen before; returns
    how many identities were written. The caller commits."""
    rows = {}
    for raw, (messages, spam) in counts.items():
        value = normalise_identity(raw)
        if value is None or (messages <= 0 and spam <= 0):
            continue
        value = value[:MAX_IDENTITY]
        before = rows.get(value, (0, 0))
        rows[value] = (before[0] + max(messages, 0), before[1] + max(spam, 0))
    ordered = sorted(rows.items())  # one order for every writer: no deadlocks between them
    domain_id = session.scalar(select(OutgoingUser.domain_id).where(OutgoingUser.id == user_id))
    if domain_id is None:  # the user was deleted since: its identities went with it
        return 0
    for start in range(0, len(ordered), BATCH):
        stmt = _insert(session).values([
            {"user_id": user_id, "domain_id": domain_id, "value": value,
             "message_count": messages,
             "spam_count": spam, "first_seen": now, "last_seen": now, "locked": False,
             "automatic_unlocks_used": 0}
            for value, (messages, spam) in ordered[start:start + BATCH]
        ])
        stmt = stmt.on_conflict_do_update(
            index_elements=[Identity.user_id, Identity.value],
            set_={
                "message_count": Identity.message_count + stmt.excluded.message_count,
                "spam_count": Identity.spam_count + stmt.excluded.spam_count,
                "last_seen": stmt.excluded.last_seen,
            },
        )
        session.execute(stmt)
    return len(ordered)
