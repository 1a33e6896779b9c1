"""Abuse reports (RFC 5965) for quarantined messages, a limited number per domain and hour.

An outbreak quarantines hundreds of messages in minutes; one report each would bury the
administrator. So each domain gets at most ``REPORTS_PER_HOUR`` individual reports per hour of
arrival, and the rest of that hour goes out as one digest when the hour is over. The hour is
the message's arrival hour, not the hour the worker happens to get to it, so a worker that
catches up after an outage does not add a second flood.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

from rq.job import Job
from sqlalchemy import select

from outgoing import jobs
from outgoing.models import KIND_IP, Domain, OutgoingUser, QuarantinedMessage
from outgoing.notify_addresses import may_notify
from outgoing.redis_conn import rq_connection
from outgoing.storage import FileStore
from worker import mail
from worker.arf import build_abuse_report

log = logging.getLogger(__name__)

REPORTS_PER_HOUR = 10
BUCKET_SECONDS = 3600
BUCKET_KEEP_SECONDS = 8 * 86400  # long enough for a digest delayed by a worker outage

# One atomic decision per message: the first REPORTS_PER_HOUR messages of a bucket are
# reported one by one, later ones go to the digest. A retried job gets the same answer.
_DECIDE = """
local verdict = redis.call('HGET', KEYS[1], ARGV[1])
if verdict then return verdict end
if redis.call('HLEN', KEYS[1]) < tonumber(ARGV[2]) then verdict = 'report'
else verdict = 'digest' end
redis.call('HSET', KEYS[1], ARGV[1], verdict)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return verdict
"""


def bucket_start(moment: datetime) -> int:
    stamp = int(moment.replace(tzinfo=UTC).timestamp()) if moment.tzinfo is None \
        else int(moment.timestamp())
    return stamp - stamp % BUCKET_SECONDS


def bucket_key(domain_id: int, start: int) -> str:
    return f"og:arf:{domain_id}:{start}"


def digest_job_id(domain_id: int, start: int) -> str:
    return f"og-arf-digest-{domain_id}-{start}"


def original_of(config: dict, row: QuarantinedMessage) -> bytes:
    """The stored message: the row's ``body`` column when set, else the file store."""
    if row.body is not None:
        return bytes(row.body)
    return FileStore(config["STORAGE_DIR"]).get(row.storage_key)


def _auth_results(config: dict, user: OutgoingUser | None) -> str | None:
    """What we know of how the sender authenticated (RFC 8601 syntax)."""
    if user is None or user.kind == KIND_IP:
        return None
    return f"{config['SMTP_HOSTNAME']}; auth=pass smtp.auth={user.name}"


def report(db, redis, config: dict, message_id: int) -> str:
    row = db.get(QuarantinedMessage, message_id)
    if row is None:
        return "message no longer in the quarantine; nothing sent"
    domain = db.get(Domain, row.domain_id)
    address = domain.abuse_report_address if domain else None
    if not address:
        return "the domain has no abuse report address; nothing sent"
    if not may_notify(db, domain, address):
        return f"{address} is not confirmed for {domain.name}; nothing sent"
    start = bucket_start(row.received_at)
    verdict = redis.eval(_DECIDE, 1, bucket_key(domain.id, start), str(row.id),
                         REPORTS_PER_HOUR, BUCKET_KEEP_SECONDS)
    if (verdict.decode() if isinstance(verdict, bytes) else verdict) == "digest":
        job_id = digest_job_id(domain.id, start)
        if not Job.exists(job_id, connection=rq_connection(redis)):
            jobs.enqueue(redis, "worker.jobs.send_abuse_digest", domain.id, start,
                         at=datetime.fromtimestamp(start + BUCKET_SECONDS, UTC), job_id=job_id)
        return f"over {REPORTS_PER_HOUR} reports this hour; left for the digest"
    try:
        original = original_of(config, row)
    except (OSError, ValueError) as exc:
        log.warning("quarantined message %s: body unreadable (%s); no abuse report", row.id, exc)
        return f"the stored message cannot be read ({exc}); nothing sent"
    user = db.get(OutgoingUser, row.user_id) if row.user_id else None
    data = build_abuse_report(
        original=original, reporter=config["NOTIFY_FROM"], to=address,
        mail_from=row.mail_from or "", rcpt_tos=_recipients(row), arrival=row.received_at,
        source_ip=row.client_ip, reported_domain=domain.name,
        auth_results=_auth_results(config, user), reason=row.reason or "classified as spam")
    try:
        sent = mail.send_once(config, redis, f"arf:{row.id}", data,
                              sender=config["NOTIFY_FROM"], to=[address])
    except mail.MailRefused as exc:
        return f"abuse report refused: {exc}"
    return f"abuse report sent to {address}" if sent else "abuse report already sent"


def digest(db, redis, config: dict, domain_id: int, start: int) -> str:
    domain = db.get(Domain, domain_id)
    if domain is None or not domain.abuse_report_address:
        return "the domain has no abuse report address; nothing sent"
    if not may_notify(db, domain, domain.abuse_report_address):
        return f"{domain.abuse_report_address} is not confirmed for {domain.name}; nothing sent"
    entries = redis.hgetall(bucket_key(domain_id, start))
    ids = sorted(int(k) for k, v in entries.items() if v in (b"digest", "digest"))
    begin = datetime.fromtimestamp(start, UTC)
    end = begin + timedelta(seconds=BUCKET_SECONDS)
    rows = list(db.scalars(_digest_rows(domain_id, ids, begin, end)))
    if not rows:
        return "nothing left for the digest"
    lines = [
        f"{len(rows)} more outgoing messages from {domain.name} were quarantined between "
        f"{begin:%Y-%m-%d %H:%M} and {end:%H:%M} UTC.",
        f"Abuse reports are sent for the first {REPORTS_PER_HOUR} messages of each hour; "
        "the rest are listed here instead.",
        "",
    ]
    for row in rows:
        sender = mail.one_line(row.mail_from or "<>")
        lines += [f"- {row.received_at:%Y-%m-%d %H:%M:%S} UTC  from {sender}"
                  + (f"  (client {row.client_ip})" if row.client_ip else ""),
                  f"  Subject: {mail.one_line(row.subject or '(no subject)')}",
                  f"  To: {mail.one_line(', '.join(_recipients(row))) or '(none)'}",
                  f"  Reason: {mail.one_line(row.reason or '')}"]
    body = "\n".join(lines) + "\n"
    message = mail.compose(
        sender=config["NOTIFY_FROM"], to=domain.abuse_report_address,
        subject=f"[Outbound Guard] Abuse digest for {domain.name}: {len(rows)} more messages",
        body=body)
    try:
        sent = mail.send_once(config, redis, f"arf-digest:{domain_id}:{start}", message,
                              sender=config["NOTIFY_FROM"], to=[domain.abuse_report_address])
    except mail.MailRefused as exc:
        return f"abuse digest refused: {exc}"
    return f"digest of {len(rows)} messages sent" if sent else "digest already sent"


def _digest_rows(domain_id: int, ids: list[int], begin: datetime, end: datetime):
    """The bucket's messages, of this domain and hour only: the bucket holds ids, and a
    message deleted since (released, expired) may have left its id to another domain's
    message (SQLite reuses the highest id), which must not go into this domain's digest."""
    naive_begin, naive_end = begin.replace(tzinfo=None), end.replace(tzinfo=None)
    return (select(QuarantinedMessage)
            .where(QuarantinedMessage.id.in_(ids),
                   QuarantinedMessage.domain_id == domain_id,
                   QuarantinedMessage.received_at >= naive_begin,
                   QuarantinedMessage.received_at < naive_end)
            .order_by(QuarantinedMessage.received_at, QuarantinedMessage.id))


def _recipients(row: QuarantinedMessage) -> list[str]:
    try:
        value = json.loads(row.rcpt_tos or "[]")
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []
