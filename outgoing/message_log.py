"""The message log: one record per SMTP transaction, whatever its outcome.

The proxy appends each record to a Redis stream (one XADD, fire-and-forget, capped with
``MAXLEN ~``) so logging never delays a reply; the worker reads the stream through a
consumer group and bulk-inserts into ``message_log`` (``worker/message_log_jobs.py``). An
entry leaves the group's pending list (XACK) only after its row is committed, and the row's
unique ``stream_id`` makes writing it twice (a worker that died between the two) a no-op.

On PostgreSQL the table is partitioned by day: retention drops whole partitions and the
worker creates them ahead. On SQLite rows are deleted in batches.

The search is a keyset walk over ``(at, id)`` newest first, each filter served by an index
led by its column (sender, user, Message-ID, domain) and bounded by the time range.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import and_, or_, select, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from outgoing.ids import MAX_BIG_ID, parse_id
from outgoing.models import MessageLogEntry

STREAM = "og:message-log"
GROUP = "message-log-writers"
FIRST_RECIPIENTS = 10  # recipients kept per record (the count is always kept)
PAGE_SIZE = 50
# The panel's Log Search (webapp/message_log.py is mounted here): the worker links to it from
# lock alerts without importing the web app. Its filters: from, to (UTC, YYYY-MM-DDTHH:MM),
# user, identity, sender, recipient, message_id, queue_id, subject, verdict.
SEARCH_PATH = "/outgoing/log"

# Where the transaction ended, and what became of it.
STAGES = ("connect", "auth", "mail", "rcpt", "data", "content", "relay")
VERDICTS = {
    "relayed": "Relayed",
    "partial": "Partially refused",
    "quarantined": "Quarantined",
    "held": "Held",  # compromise detection's Hold: accepted, kept on Held Mail
    "throttled": "Throttled",  # compromise detection's Throttle: 451 4.7.1 over the rate
    "rejected": "Rejected",
    "deferred": "Deferred",
    "refused": "Refused",
    "abandoned": "Abandoned",
}

_TEXT_LIMITS = {"client_ip": 45, "user_name": 320, "login": 320, "identity": 320,
                "mail_from": 320, "message_id": 320, "subject": 300, "reply": 512,
                "next_hop_reply": 512, "queue_id": 32, "stage": 16, "verdict": 16,
                "stored_kind": 16}


# --- the record, as the proxy writes it and the worker reads it ---------------------------

def encode(record: dict) -> dict[str, str]:
    """The stream entry's fields: one JSON document, so a new field needs no new code path."""
    return {"r": json.dumps(record, separators=(",", ":"), default=str)}


def row_from_entry(stream_id: str, fields: dict) -> dict | None:
    """The table row of one stream entry; None for an entry that cannot be read (it is
    acknowledged and skipped, never retried forever).

    Every value is made one the database takes, whatever the entry holds: a batch is one
    transaction, so a single value it refused would fail every run and stall the log for
    everyone (a NUL in text, which PostgreSQL refuses, comes straight from an AUTH LOGIN
    name anyone may send)."""
    raw = fields.get(b"r", fields.get("r"))
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            return None
        at = datetime.fromtimestamp(float(record["at"]), UTC).replace(tzinfo=None)
        row = {"stream_id": stream_id, "at": at}
        for name, limit in _TEXT_LIMITS.items():
            value = record.get(name)
            row[name] = None if value is None else _text(value, limit)
        row["stage"] = row["stage"] or "data"
        row["verdict"] = row["verdict"] or "refused"
        for name in ("domain_id", "user_id", "size", "stored_id"):
            row[name] = _integer(record.get(name))
        for name in ("score", "relay_seconds"):
            value = record.get(name)
            row[name] = float(value) if isinstance(value, int | float) and \
                math.isfinite(value) else None
        listed = record.get("recipients")
        listed = listed if isinstance(listed, list) else []
        recipients = [_text(r, 320) for r in listed][:FIRST_RECIPIENTS]
        row["recipients"] = "\n".join(recipients) or None
        row["rcpt_count"] = _integer(record.get("rcpt_count")) or len(recipients)
        row["refused_count"] = _integer(record.get("refused_count")) or 0
        rules = record.get("rules")
        row["rules"] = json.dumps(list(rules)[:50]) if isinstance(rules, list) and rules \
            else None
    except (TypeError, ValueError, KeyError, OverflowError, OSError):
        return None
    return row


_INTEGER_MAX = 2**31 - 1  # the columns' type on PostgreSQL


def _integer(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or not -_INTEGER_MAX <= value <= _INTEGER_MAX:
        return None
    return int(value)


def _text(value, limit: int) -> str:
    """``value`` as text the database stores: no NUL, no lone surrogate, at most ``limit``
    characters."""
    text_ = str(value).replace("\x00", "\ufffd")
    return text_.encode("utf-8", "replace").decode("utf-8")[:limit]


def insert_rows(session, rows: list[dict]) -> int:
    """Insert ``rows`` in one statement per batch, skipping any already written (same
    stream entry); returns how many were new."""
    if not rows:
        return 0
    if session.get_bind().dialect.name == "postgresql":
        ensure_partitions(session, {row["at"].date() for row in rows})
        return _copy_rows(session, rows)
    statement = sqlite_insert(MessageLogEntry.__table__).on_conflict_do_nothing()
    result = session.connection().execute(statement, rows)
    return result.rowcount if result.rowcount is not None and result.rowcount >= 0 \
        else len(rows)


_COPY_COLUMNS = [c.name for c in MessageLogEntry.__table__.columns if c.name != "id"]


def _copy_rows(session, rows: list[dict]) -> int:
    """PostgreSQL: COPY the batch into a temporary table, then one INSERT ... SELECT ...
    ON CONFLICT DO NOTHING (several times faster than a multi-row INSERT per batch)."""
    columns = ", ".join(_COPY_COLUMNS)
    session.execute(text(
        "CREATE TEMP TABLE IF NOT EXISTS message_log_incoming AS "
        f"SELECT {columns} FROM message_log WITH NO DATA"))
    session.execute(text("TRUNCATE message_log_incoming"))
    cursor = session.connection().connection.dbapi_connection.cursor()
    with cursor.copy(f"COPY message_log_incoming ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([row.get(name) for name in _COPY_COLUMNS])
    result = session.execute(text(
        f"INSERT INTO message_log ({columns}) SELECT {columns} FROM message_log_incoming "
        "ON CONFLICT (stream_id, at) DO NOTHING"))
    return result.rowcount


# --- partitions and retention ------------------------------------------------------------

_known_partitions: set[date] = set()


def partition_name(day: date) -> str:
    return f"message_log_{day:%Y%m%d}"


def ensure_partitions(session, days) -> list[str]:
    """Create the day partitions of ``days`` that do not exist yet (PostgreSQL only)."""
    created = []
    for day in sorted(set(days) - _known_partitions):
        name = partition_name(day)
        exists = session.scalar(text("SELECT to_regclass(:name)"), {"name": name})
        if exists is None:
            session.execute(text(
                f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF message_log "
                f"FOR VALUES FROM ('{day}') TO ('{day + timedelta(days=1)}')"))
            created.append(name)
        _known_partitions.add(day)
    return created


def partitions(session) -> list[tuple[str, date]]:
    """The day partitions of ``message_log`` and their days, oldest first."""
    names = session.scalars(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'message_log'::regclass")).all()
    days = []
    for name in names:
        try:
            days.append((name, datetime.strptime(name[-8:], "%Y%m%d").date()))
        except ValueError:
            continue
    return sorted(days, key=lambda item: item[1])


def expire(session, *, retention_days: int, now: datetime, ahead_days: int = 3,
           batch: int = 5000) -> str:
    """Keep ``retention_days`` days: drop older partitions (PostgreSQL) or delete older rows
    in batches of ``batch`` (SQLite, so no single transaction holds the writer long); on
    PostgreSQL also create the partitions of the next ``ahead_days`` days."""
    cutoff = now - timedelta(days=retention_days)
    if session.get_bind().dialect.name == "postgresql":
        created = ensure_partitions(
            session, [now.date() + timedelta(days=n) for n in range(ahead_days + 1)])
        dropped = []
        for name, day in partitions(session):
            if retention_days > 0 and day + timedelta(days=1) <= cutoff.date():
                session.execute(text(f"DROP TABLE IF EXISTS {name}"))
                _known_partitions.discard(day)
                dropped.append(name)
        session.commit()
        return f"created {len(created)} partition(s), dropped {len(dropped)}"
    if retention_days <= 0:
        return "retention off"
    deleted = 0
    while True:
        ids = select(MessageLogEntry.id).where(MessageLogEntry.at < cutoff).limit(batch)
        result = session.execute(MessageLogEntry.__table__.delete().where(
            MessageLogEntry.id.in_(ids)))
        session.commit()
        deleted += result.rowcount or 0
        if not result.rowcount or result.rowcount < batch:
            return f"deleted {deleted} row(s)"


# --- lag ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lag:
    entries: int  # in the stream and not yet written (never read, or read and pending)
    seconds: float  # age of the oldest of them
    length: int  # entries in the stream (written ones stay until MAXLEN trims them)


def _stream_time(entry_id) -> float:
    text_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text_id.split("-")[0]) / 1000.0


MAX_LAG_COUNT = 100_000  # entries counted one by one when Redis cannot say


def lag(redis, now: float | None = None) -> Lag:
    """How far the database is behind the stream (for the metrics)."""
    now = time.time() if now is None else now
    length = redis.xlen(STREAM)
    try:
        groups = redis.xinfo_groups(STREAM)
    except Exception:  # no stream yet
        groups = []
    group = next((g for g in groups if _name(g.get("name")) == GROUP), None)
    if group is None:
        if not length:
            return Lag(0, 0.0, 0)
        first = redis.xrange(STREAM, count=1)
        return Lag(length, max(0.0, now - _stream_time(first[0][0])), length)
    pending = int(group.get("pending") or 0)
    unread = group.get("lag")
    if unread is None:
        # Redis before 7 has no lag, and 7 answers none when entries were deleted in
        # between: count what lies after the last entry handed to a consumer (bounded).
        last = _name(group.get("last-delivered-id")) or "0-0"
        unread = len(redis.xrange(STREAM, min=f"({last}", count=MAX_LAG_COUNT))
    unread = int(unread)
    oldest = None
    if pending:
        summary = redis.xpending(STREAM, GROUP)
        oldest = summary.get("min")
    if oldest is None and unread:
        last = _name(group.get("last-delivered-id")) or "0-0"
        after = redis.xrange(STREAM, min=f"({last}", count=1)
        oldest = after[0][0] if after else None
    seconds = max(0.0, now - _stream_time(oldest)) if oldest is not None else 0.0
    return Lag(pending + unread, seconds, length)


def _name(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


# --- the search --------------------------------------------------------------------------

@dataclass
class LogSearch:
    """Log Search's filters; empty ones do not filter."""

    since: datetime | None = None
    until: datetime | None = None
    user_ids: list[int] | None = None  # None: any user; []: no user matches
    identity: str = ""
    sender: str = ""
    recipient: str = ""
    message_id: str = ""
    queue_id: str = ""  # ours, from the Received: field we add ("id 3F2A9C01B7")
    subject: str = ""
    verdict: str = ""
    client_ip: str = ""


@dataclass
class LogPage:
    rows: list[MessageLogEntry]
    next: str | None = None


def encode_cursor(row: MessageLogEntry) -> str:
    return f"{row.at.isoformat()}_{row.id}"


def decode_cursor(value: str | None) -> tuple[datetime, int] | None:
    """A cursor from a URL, or None when it is missing or tampered with (first page)."""
    if not value or "_" not in value:
        return None
    at_text, _, id_text = value.rpartition("_")
    row_id = parse_id(id_text, maximum=MAX_BIG_ID)
    if row_id is None:
        return None
    try:
        return datetime.fromisoformat(at_text), row_id
    except ValueError:
        return None


def search(session, criteria: LogSearch, *, domain_id: int | None, after: str | None = None,
           size: int = PAGE_SIZE) -> LogPage:
    """One page of the log, newest first; ``domain_id`` limits it to one domain (a domain
    admin; rows without a domain are then never shown)."""
    rows = list(session.scalars(search_query(criteria, domain_id=domain_id, after=after,
                                             size=size)))
    page = LogPage(rows[:size])
    if len(rows) > size:
        page.next = encode_cursor(rows[size - 1])
    return page


def search_query(criteria: LogSearch, *, domain_id: int | None, after: str | None = None,
                 size: int = PAGE_SIZE):
    """The query of one page (``size`` + 1 rows, to know whether another page follows)."""
    entry = MessageLogEntry
    query = select(entry)
    if domain_id is not None:
        query = query.where(entry.domain_id == domain_id)
    if criteria.since is not None:
        query = query.where(entry.at >= criteria.since)
    if criteria.until is not None:
        query = query.where(entry.at < criteria.until)
    if criteria.user_ids is not None:
        query = query.where(entry.user_id.in_(criteria.user_ids or [-1]))
    if criteria.sender:
        query = query.where(entry.mail_from.in_(
            list(dict.fromkeys((criteria.sender, criteria.sender.lower())))))
    if criteria.message_id:
        value = criteria.message_id.strip()
        bare = value.strip("<>")
        query = query.where(entry.message_id.in_(list(dict.fromkeys((value, f"<{bare}>",
                                                                        bare)))))
    if criteria.queue_id:
        query = query.where(entry.queue_id == criteria.queue_id.strip().upper())
    if criteria.identity:
        query = query.where(entry.identity == criteria.identity)
    if criteria.verdict:
        query = query.where(entry.verdict == criteria.verdict)
    if criteria.client_ip:
        query = query.where(entry.client_ip == criteria.client_ip)
    if criteria.recipient:
        # Exact address among the first N stored, one per line.
        address = criteria.recipient.lower()
        line = entry.recipients
        query = query.where(or_(line.ilike(_like(address)),
                                line.ilike(_like(address) + "\n%"),
                                line.ilike("%\n" + _like(address)),
                                line.ilike("%\n" + _like(address) + "\n%")))
    for word in criteria.subject.split()[:8]:
        query = query.where(entry.subject.ilike("%" + _like(word) + "%"))
    cursor = decode_cursor(after)
    if cursor is not None:
        at, row_id = cursor
        # The first clause lets the planner start the index walk at the cursor.
        query = query.where(and_(entry.at <= at, or_(entry.at < at, entry.id < row_id)))
    return query.order_by(entry.at.desc(), entry.id.desc()).limit(size + 1)


def _like(value: str) -> str:
    """``value`` inside a LIKE pattern: no ``%`` of its own (a ``_`` still matches itself,
    and at worst one other character)."""
    return value.replace("\\", "").replace("%", "")


def recipients_of(row: MessageLogEntry) -> list[str]:
    return (row.recipients or "").split("\n") if row.recipients else []


def rules_of(row: MessageLogEntry) -> list[str]:
    try:
        return list(json.loads(row.rules or "[]"))
    except ValueError:
        return []
