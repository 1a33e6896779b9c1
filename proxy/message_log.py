"""The proxy's side of the message log: build one record per SMTP transaction and append it
to the Redis stream without waiting (``outgoing/message_log.py`` has the rest).

The XADD runs as a background task on the event loop, so the reply never waits for it; when
Redis fails the record is lost, counted and logged (rate-limited), and the sender's mail is
not affected.
"""

from __future__ import annotations

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
    def __init__(self, redis, *, maxlen: int, background, faults):
        self.redis = redis
        self.maxlen = maxlen
        self._background = background
        self._faults = faults

    def write(self, record: dict) -> None:
        """Count the transaction and append its record in the background."""
        metrics.TRANSACTIONS.labels(record.get("stage") or "data",
                                    record.get("verdict") or "refused").inc()
        metrics.REPLIES.labels((record.get("reply") or "000")[:3]).inc()
        try:
            self._background(self._append(encode(record)))
        except RuntimeError:  # no running loop (shutting down): the record is lost
            metrics.MESSAGE_LOG_ERRORS.inc()

    async def _append(self, fields: dict) -> None:
        try:
            await self.redis.xadd(STREAM, fields, maxlen=self.maxlen, approximate=True)
        except Exception as exc:
            metrics.MESSAGE_LOG_ERRORS.inc()
            self._faults.warning("message-log", "could not append to the message log (%s); "
                                 "records are lost until Redis answers", exc)
