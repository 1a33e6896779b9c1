"""RQ jobs of the message log: write the proxy's stream to the database, and retention.

Writing runs as a periodic job every few seconds (``outgoing.jobs.PERIODIC``), each run
working for at most ``BUDGET_SECONDS``, rather than one job looping forever: the worker
serves one job at a time, so a lock notice or an unlock waits at most that long behind it,
and a worker restart needs nothing special. A run:

1. takes over entries another consumer read but never acknowledged for
   ``MESSAGE_LOG_CLAIM_IDLE_SECONDS`` (it died mid-batch: XAUTOCLAIM);
2. reads new entries (XREADGROUP) in batches of ``BATCH``;
3. inserts each batch in one transaction and acknowledges it (XACK) only after the commit;
4. trims what the group has written from the stream.

A run that dies between 3's commit and its XACK leaves entries that the next run claims and
inserts again; the unique stream id turns that into a no-op, so nothing is lost or doubled.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import UTC, datetime

from redis.exceptions import ResponseError

from outgoing import message_log
from outgoing import metrics as shared_metrics
from outgoing.db import session_scope
from outgoing.message_log import GROUP, STREAM
from outgoing.models import utcnow
from worker import context

log = logging.getLogger(__name__)

BATCH = 2000
BUDGET_SECONDS = 3.0
IDLE_CONSUMER_SECONDS = 3600  # consumers with nothing pending, gone this long, are removed


def ensure_group(redis) -> None:
    """The consumer group, reading from the stream's start (entries the proxy wrote before
    any worker ran are written too)."""
    try:
        redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def consumer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _write(redis, sessionmaker, entries) -> int:
    """Insert one batch and acknowledge it; unreadable entries are acknowledged too."""
    if not entries:
        return 0
    rows, ids = [], []
    for entry_id, fields in entries:
        text_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        ids.append(text_id)
        if fields is None:  # trimmed from the stream while pending
            continue
        row = message_log.row_from_entry(text_id, fields)
        if row is None:
            log.warning("message log: entry %s cannot be read; skipped", text_id)
            continue
        rows.append(row)
    with session_scope(sessionmaker) as db:
        message_log.insert_rows(db, rows)
    redis.xack(STREAM, GROUP, *ids)
    shared_metrics.count(redis, "message_log_written", len(rows))
    return len(rows)


def write_batches(redis, sessionmaker, *, consumer: str, claim_idle: float,
                  budget: float = BUDGET_SECONDS, batch: int = BATCH) -> int:
    """Claim abandoned entries, then read new ones until the stream is drained or
    ``budget`` seconds have passed; returns the rows written."""
    ensure_group(redis)
    deadline = time.monotonic() + budget
    written = 0
    start = "0-0"
    while time.monotonic() < deadline:
        start, claimed, *_ = redis.xautoclaim(STREAM, GROUP, consumer,
                                              min_idle_time=int(claim_idle * 1000),
                                              start_id=start, count=batch)
        if claimed:
            log.info("message log: took over %d entries of a consumer that stopped",
                     len(claimed))
            written += _write(redis, sessionmaker, claimed)
        if start in (b"0-0", "0-0"):
            break
    while time.monotonic() < deadline:
        response = redis.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=batch)
        entries = response[0][1] if response else []
        if not entries:
            break
        written += _write(redis, sessionmaker, entries)
    _forget_idle_consumers(redis, consumer)
    trim_written(redis)
    return written


def trim_written(redis) -> None:
    """Drop the entries the group has written from the stream, so Redis holds only what is
    still to be written (MAXLEN is the cap for when the worker is away): everything older
    than the oldest entry still pending, or, with nothing pending, than the last one read.
    Entries newer than that are never touched, whatever other consumers do meanwhile."""
    group = next((g for g in redis.xinfo_groups(STREAM)
                  if _text(g.get("name")) == GROUP), None)
    if group is None:
        return
    oldest = _text(redis.xpending(STREAM, GROUP).get("min")) if group.get("pending") \
        else _text(group.get("last-delivered-id"))
    if oldest and oldest != "0-0":
        redis.xtrim(STREAM, minid=oldest, approximate=False)


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _forget_idle_consumers(redis, current: str) -> None:
    """Each run is its own consumer (RQ forks a process per job); remove the old ones that
    hold nothing, so the group's list stays short."""
    try:
        for info in redis.xinfo_consumers(STREAM, GROUP):
            name = info.get("name")
            name = name.decode() if isinstance(name, bytes) else name
            if name != current and not info.get("pending") and \
                    int(info.get("idle") or 0) > IDLE_CONSUMER_SECONDS * 1000:
                redis.xgroup_delconsumer(STREAM, GROUP, name)
    except ResponseError as exc:
        log.warning("message log: could not tidy the consumer list: %s", exc)


def write_message_log(due: str | None = None) -> str:
    """Write what the proxy appended to the stream into the database (periodic)."""
    config = context.config()
    written = write_batches(context.redis_client(), context.sessionmaker(),
                            consumer=consumer_name(),
                            claim_idle=float(config["MESSAGE_LOG_CLAIM_IDLE_SECONDS"]))
    return f"wrote {written} message-log row(s)"


def expire_message_log(due: str | None = None) -> str:
    """Retention (MESSAGE_LOG_RETENTION_DAYS; 0 keeps everything) and, on PostgreSQL, the
    day partitions of the coming days (hourly)."""
    now = (datetime.fromisoformat(due).astimezone(UTC).replace(tzinfo=None) if due
           else utcnow())
    with session_scope(context.sessionmaker()) as db:
        return message_log.expire(
            db, retention_days=int(context.config()["MESSAGE_LOG_RETENTION_DAYS"]), now=now)
