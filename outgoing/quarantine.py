"""The outgoing quarantine: storing a message durably before the sender hears back, and the
operations the control panel and the worker perform on it (remove, mark released, expire).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from outgoing.models import QuarantinedMessage, utcnow
from outgoing.storage import commit_with_bodies, discard_body

AREA = "quarantine"


class Abandoned(Exception):
    """A write whose caller stopped waiting before it committed: rolled back."""


def _durable_commits(session) -> None:
    """SQLite in WAL mode with synchronous=NORMAL can lose the last commits on power loss;
    a quarantined message was promised to the sender, so this commit is synced to disk."""
    if session.get_bind().dialect.name != "sqlite":
        return
    dbapi = session.connection().connection.dbapi_connection
    if not dbapi.in_transaction:  # the pragma cannot change inside a transaction
        dbapi.execute("PRAGMA synchronous=FULL")


def stored_text(value: str | None, limit: int) -> str | None:
    """A header's text (a Subject, an identity) as the database can store it: a NUL, which
    PostgreSQL refuses in text ("=?utf-8?q?a=00b?=" decodes to one), is U+FFFD, and a lone
    surrogate, which UTF-8 cannot hold, is "?"; at most ``limit`` characters. None stays
    None."""
    if value is None:
        return None
    text = str(value).replace("\x00", "\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8")[:limit]


def quarantine_message(session, store, *, domain_id: int, user_id: int | None,
                       mail_from: str, rcpt_tos: list[str], data: bytes, subject: str,
                       identity: str | None, client_ip: str | None, reason: str,
                       score: float, rules: list[str] | tuple[str, ...],
                       received_at: datetime | None = None,
                       wanted=None) -> QuarantinedMessage:
    """Store the body, then the row; both are durable when this returns."""
    row = QuarantinedMessage(
        domain_id=domain_id, user_id=user_id, mail_from=mail_from[:320],
        rcpt_tos=json.dumps(list(rcpt_tos), ensure_ascii=False),
        subject=stored_text(subject or "", 500), size=len(data),
        identity=stored_text(identity or None, 255), client_ip=client_ip,
        reason=stored_text(reason, 500), score=float(score), rules=json.dumps(list(rules)),
        received_at=received_at or utcnow(),
    )
    return store_durably(session, store, row, data, AREA, wanted)


def store_durably(session, store, row, data: bytes, area: str, wanted=None):
    """The body, then the row; both durable when this returns (the sender may get 250).
    ``wanted``, asked once the row is written and before the commit: False rolls it back
    (``Abandoned``; see proxy/database.py)."""
    store.attach(row, data, area)
    session.add(row)
    try:
        _durable_commits(session)
        if wanted is not None:
            session.flush()
            if not wanted():
                raise Abandoned("the sender stopped waiting for this message")
    except BaseException:
        store.discard(row.storage_key)
        raise
    commit_with_bodies(session, store, [row])
    return row


def recipients(row) -> list[str]:
    try:
        value = json.loads(row.rcpt_tos or "[]")
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def rules_of(row) -> list[str]:
    try:
        value = json.loads(row.rules or "[]")
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def remove_messages(session, config: dict, rows) -> int:
    """Delete rows, then their bodies (a crash in between leaves an orphan file, never a row
    whose body is gone)."""
    rows = list(rows)
    keys = [row.storage_key for row in rows]
    for row in rows:
        session.delete(row)
    session.commit()
    for key in keys:
        discard_body(config, key)
    return len(rows)


def purge_older_than(session, config: dict, model, cutoff: datetime, batch: int = 500) -> int:
    """Delete ``model`` rows (quarantined or archived) received before ``cutoff``."""
    return purge_where(session, config, model, model.received_at < cutoff, batch)


def purge_where(session, config: dict, model, condition, batch: int = 500) -> int:
    """Delete the stored messages (``model`` rows) that match ``condition``, and their bodies,
    in batches so a large backlog never holds one long transaction."""
    total = 0
    while True:
        found = session.execute(select(model.id, model.storage_key)
                                .where(condition)
                                .order_by(model.id).limit(batch)).all()
        if not found:
            return total
        session.execute(delete(model).where(model.id.in_([row.id for row in found])))
        session.commit()
        for row in found:
            discard_body(config, row.storage_key)
        total += len(found)


def expire_quarantine(session, config: dict, now: datetime | None = None) -> int:
    """Enforce ``QUARANTINE_RETENTION_DAYS`` (0 keeps messages forever)."""
    days = int(config.get("QUARANTINE_RETENTION_DAYS") or 0)
    if days <= 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=days)
    return purge_older_than(session, config, QuarantinedMessage, cutoff)
