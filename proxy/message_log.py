"""The proxy's side of the message log: build one record per SMTP transaction and append it
to the Redis stream without waiting (``outgoing/message_log.py`` has the rest).

The reply never waits for the XADD: records queue in the process and one writer task sends
them, pipelined; when Redis fails a record is lost, counted and logged (rate-limited), and
the sender's mail is not affected.
"""

from __future__ import annotations

import asyncio
from collections import deque

from outgoing.message_log import FIRST_RECIPIENTS, STREAM, encode
from proxy import metrics


def new_record(at: float, client_ip: str, user=None, **fields) -> dict:
    """A record of a transaction that started at ``at`` (epoch seconds)."""
    record = {"at": at, "client_ip": client_ip, "recipients": [], "rcpt_count": 0,
              "refused_count": 0}
    if user is not None:
        record.update(user_id=user.id, domain_id=user.domain_id, user_name=user.name)
    record.update(fields)
    return record


def add_recipient(record: dict, address: str) -> None:
    record["rcpt_count"] += 1
    if len(record["recipients"]) < FIRST_RECIPIENTS:
        record["recipients"].append(address)


def finish(record: dict, reply: str) -> dict:
    """Set the reply and, unless a stage already said, the verdict that follows from it."""
    record["reply"] = reply
    record.setdefault("stage", "data")
    if not record.get("verdict"):
        code = reply[:1]
        if code == "2":
            record["verdict"] = "partial" if record.get("refused_count") else "relayed"
        elif record["stage"] in ("connect", "auth", "mail", "rcpt"):
            record["verdict"] = "refused"
        elif code == "4":
            record["verdict"] = "deferred"
        elif record["stage"] in ("content", "relay"):
            record["verdict"] = "rejected"
        else:
            record["verdict"] = "refused"
    return record


class MessageLog:
    """Records wait in a bounded in-process queue; one writer task sends them to Redis in
    pipelined batches (one XADD per record, one round trip per batch). So a slow or hung
    Redis holds one connection, never one per message, and costs no reply any time: the
    queue fills, further records are dropped and counted, mail flows on.

    A woken writer lingers ``linger`` seconds before it sends, so that the records of that
    moment go together: at hundreds of messages a second, one round trip carries a dozen
    records instead of one each (a round trip costs the proxy more CPU than the XADDs in
    it). A record waits that long at most for Redis; a stop sends what waits first
    (``close``), a crash loses at most that moment's records."""

    BATCH = 500
    LINGER = 0.02

    def __init__(self, redis, *, maxlen: int, faults, limit: int = 20000,
                 linger: float = LINGER):
        self.redis = redis
        self.maxlen = maxlen
        self.limit = limit
        self.linger = linger
        self._faults = faults
        self._pending: deque[dict] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    def write(self, record: dict) -> None:
        """Count the transaction and queue its record for the writer."""
        metrics.TRANSACTIONS.labels(record.get("stage") or "data",
                                    record.get("verdict") or "refused").inc()
        metrics.REPLIES.labels((record.get("reply") or "000")[:3]).inc()
        if len(self._pending) >= self.limit:
            metrics.MESSAGE_LOG_ERRORS.inc()
            self._faults.warning("message-log-full", "message log: %d records wait for "
                                 "Redis already; dropping new ones", self.limit)
            return
        self._pending.append(encode(record))
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (shutting down): the record stays queued
                return
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
        self._wake.set()

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            if self.linger and len(self._pending) < self.BATCH and not self._closing:
                await asyncio.sleep(self.linger)
            self._wake.clear()
            await self._send_batch()
            if self._pending:  # written while it was sent: they linger in turn
                self._wake.set()

    async def _send(self) -> None:
        while self._pending:
            await self._send_batch()

    async def _send_batch(self) -> None:
        """One round trip: the oldest BATCH records at most."""
        if self._pending:
            batch = [self._pending.popleft()
                     for _ in range(min(self.BATCH, len(self._pending)))]
            pipe = self.redis.pipeline(transaction=False)
            for fields in batch:
                pipe.xadd(STREAM, fields, maxlen=self.maxlen, approximate=True)
            metrics.MESSAGE_LOG_BATCHES.inc()
            try:
                await pipe.execute()
            except Exception as exc:
                metrics.MESSAGE_LOG_ERRORS.inc(len(batch))
                self._faults.warning("message-log", "could not append %d record(s) to the "
                                     "message log (%s); they are lost", len(batch), exc)

    async def close(self) -> None:
        """Send what is queued and stop the writer (the caller bounds the wait)."""
        self._closing = True
        if self._task is not None and not self._task.done():
            self._wake.set()
            await self._task
        await self._send()
