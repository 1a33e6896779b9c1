"""RQ jobs of the content stage: delivery reports for recipients the next hop refused, retries
of the ones it refused for now, and the daily import of the newly registered domains list.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import secrets
import smtplib
import time
from datetime import UTC, datetime
from email.header import Header
from email.utils import format_datetime, make_msgid

from rq import get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job

from outgoing.jobs import enqueue, enqueue_delivery_report
from outgoing.newdomains import import_file
from scoring.message import header_block
from scoring.retry import next_attempt_at, parse_delays, split_refusals
from worker import context, mail
from worker.quarantine_jobs import RelayRefused, relay_sync

log = logging.getLogger(__name__)

_STATUS = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")


def _line(value: object, limit: int = 400) -> str:
    return " ".join(str(value).split())[:limit]


def _status(code: int, text: str) -> str:
    """The enhanced status code the next hop gave, else one derived from its reply code."""
    found = _STATUS.match(text or "")
    if found:
        return found.group(1)
    return "5.0.0" if code >= 500 else "4.0.0"


def _ascii(value: object, limit: int = 400) -> str:
    """A value on one line with every non-ASCII character as ``\\x{HEX}`` (RFC 6533's
    embedded-unicode), for the report's ASCII-only parts."""
    return "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in _line(value, limit))


def _final_recipient(rcpt: str) -> str:
    """An ASCII address as ``rfc822``, one with a non-ASCII local part or domain as RFC 6533's
    ``utf-8`` type in its ASCII (embedded-unicode) form: the report travels without SMTPUTF8
    when its own recipient, the sender, is ASCII, so no raw UTF-8 may be in its headers."""
    text = _line(rcpt, 300)
    if text.isascii():
        return f"rfc822; {text}"
    return "utf-8; " + "".join(
        c if c.isascii() and c not in "\\+=" and 32 < ord(c) < 127 else f"\\x{{{ord(c):X}}}"
        for c in text)


def _subject(text: str) -> str:
    """The Subject as it is when ASCII, else RFC 2047 encoded words: raw UTF-8 in a header
    needs SMTPUTF8, which the report to an ASCII sender is sent without."""
    if text.isascii():
        return text
    return Header(text, "utf-8", header_name="Subject").encode(linesep="\r\n")


def build_delivery_report(*, sender: str, reporter: str, reporting_mta: str,
                          refused: list[list], original_headers: bytes,
                          arrival: datetime) -> bytes:
    """An RFC 3464 ``multipart/report; report-type=delivery-status`` message (CRLF)."""
    boundary = "=_og_dsn_" + secrets.token_hex(12)
    names = ", ".join(_line(rcpt, 200) for rcpt, _, _ in refused)
    human = (
        "Your message was delivered to some of its recipients, but the next mail server\r\n"
        "refused the following ones, so it was NOT delivered to them:\r\n\r\n"
        + "".join(f"  {_line(rcpt, 300)}: {int(code)} {_line(text)}\r\n"
                  for rcpt, code, text in refused)
        + "\r\nThe headers of your message follow.\r\n"
    )
    status_fields = (f"Reporting-MTA: dns; {_line(reporting_mta, 200)}\r\n"
                     f"Arrival-Date: {format_datetime(arrival)}\r\n")
    for rcpt, code, text in refused:
        status_fields += (
            f"\r\nFinal-Recipient: {_final_recipient(rcpt)}\r\n"
            f"Action: failed\r\n"
            f"Status: {_status(int(code), str(text))}\r\n"
            f"Diagnostic-Code: smtp; {int(code)} {_ascii(text)}\r\n")
    headers = original_headers.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n").rstrip(b"\r\n")
    head = (
        f"From: Mail Delivery System <{reporter}>\r\n"
        f"To: {_line(sender, 320)}\r\n"
        f"Subject: {_subject(f'Undelivered mail: refused for {_line(names, 150)}')}\r\n"
        f"Date: {format_datetime(datetime.now(UTC))}\r\n"
        f"Message-ID: {make_msgid(domain=reporter.rpartition('@')[2] or None)}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
    )
    body = (
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: 8bit\r\n\r\n{human}\r\n"
        f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n{status_fields}\r\n"
        f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n"
        f"Content-Transfer-Encoding: {'7bit' if headers.isascii() else '8bit'}\r\n\r\n"
    ).encode()
    return head.encode() + b"\r\n" + body + headers + f"\r\n\r\n--{boundary}--\r\n".encode()


def send_delivery_report(sender: str, refused: list[list], original_headers: bytes,
                         arrival_iso: str, reporting_mta: str) -> str:
    """Mail a DSN for ``refused`` ([[recipient, code, text], ...]) to the envelope sender,
    from the null sender (RFC 5321 6.1: a bounce never bounces)."""
    config, redis = context.config(), context.redis_client()
    arrival = datetime.fromisoformat(arrival_iso).replace(tzinfo=UTC)
    report = build_delivery_report(sender=sender, reporter=config["NOTIFY_FROM"],
                                   reporting_mta=reporting_mta, refused=refused,
                                   original_headers=original_headers, arrival=arrival)
    marker = "dsn:" + hashlib.sha256(repr((sender, refused, original_headers,
                                           arrival_iso)).encode()).hexdigest()
    try:
        sent = mail.send_once(config, redis, marker, report, sender="", to=[sender])
    except mail.MailRefused as exc:
        return f"delivery report to {sender} refused: {exc}"
    return f"delivery report sent to {sender}" if sent else "delivery report already sent"


def _text(reply) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


def try_relay(config: dict, mail_from: str, rcpt_tos: list[str],
               data: bytes) -> dict[str, tuple[int, str]]:
    """Relay once; the recipients that did not get it, each with the reply that said so
    (a next hop that cannot be reached or answers 4xx to the message defers them all)."""
    try:
        refused = relay_sync(config, mail_from=mail_from, rcpt_tos=rcpt_tos, data=data)
    except RelayRefused as exc:
        cause = exc.__cause__
        if isinstance(cause, smtplib.SMTPRecipientsRefused):
            refused = cause.recipients
        else:
            code = getattr(cause, "smtp_code", 554)
            return {r: (code, _text(getattr(cause, "smtp_error", str(exc)))) for r in rcpt_tos}
    except smtplib.SMTPRecipientsRefused as exc:
        refused = exc.recipients
    except smtplib.SMTPResponseException as exc:
        return {r: (exc.smtp_code, _text(exc.smtp_error)) for r in rcpt_tos}
    except (smtplib.SMTPException, OSError) as exc:
        return {r: (451, f"4.4.1 next hop unreachable: {exc}") for r in rcpt_tos}
    return {r: (int(code), _text(text)) for r, (code, text) in refused.items()}


SETTLED_TTL = 7 * 86400  # longer than RQ's retries of one attempt take


def retry_deferred_recipients(mail_from: str, rcpt_tos: list[str], data: bytes,
                              arrival_iso: str, attempt: int) -> str:
    """Try again the recipients the next hop refused for now; those it now refuses for good,
    or still refuses when the message reaches DEFER_GIVE_UP_SECONDS, get a delivery report.

    The message lives only in this job, so the job has RQ's retries: a worker killed
    mid-attempt, or an error (the next attempt or the report cannot be queued), runs it
    again rather than dropping the recipients. A recipient this attempt settled (delivered,
    handed to the next attempt, reported) is noted under the job's id first, and a retry of
    the same job leaves it alone: nobody gets the message twice because of a retry."""
    config, redis = context.config(), context.redis_client()
    job = get_current_job()
    settled_key = f"og:retry-settled:{job.id}" if job is not None else None

    def settle(recipients) -> None:
        if settled_key and recipients:
            redis.sadd(settled_key, *recipients)
            redis.expire(settled_key, SETTLED_TTL)

    settled = ({m.decode() for m in redis.smembers(settled_key)} if settled_key else set())
    # The next attempt has an id made from this one's: queued again by a retry of this job
    # (killed after queuing it, before noting its recipients settled) it replaces itself,
    # and a retry finding it already queued leaves its recipients to it.
    next_id = f"{job.id}-next" if job is not None else None
    if next_id:
        with contextlib.suppress(NoSuchJobError):
            settled.update(Job.fetch(next_id, connection=job.connection).args[1])
            next_id = None  # taken: recipients deferred anew get a job of their own
    pending = [r for r in rcpt_tos if r not in settled]
    if not pending:
        return f"attempt {attempt}: every recipient settled before"
    arrival = datetime.fromisoformat(arrival_iso)
    refused = try_relay(config, mail_from, pending, data)
    settle([r for r in pending if r not in refused])
    final, deferred = split_refusals(refused)
    later = list(deferred)
    now = datetime.now(UTC).replace(tzinfo=None)
    outcome = f"attempt {attempt}: {len(pending) - len(refused)} of {len(pending)} delivered"
    if later:
        due = next_attempt_at(attempt=attempt + 1, arrival=arrival, now=now,
                              delays=parse_delays(config["DEFER_RETRY_SECONDS"]),
                              give_up_seconds=config["DEFER_GIVE_UP_SECONDS"])
        if due is None:
            log.warning("giving up on %d recipient(s) of a message from %s after %d attempts",
                        len(later), mail_from, attempt)
            final.update({r: refused[r] for r in later})
            outcome += f", gave up on {len(later)}"
        else:
            try:
                enqueue(redis, "worker.content_jobs.retry_deferred_recipients", mail_from,
                        later, data, arrival_iso, attempt + 1, at=due, job_id=next_id)
            except Exception:
                if job is not None and job.retries_left:
                    raise  # RQ runs this job again, the recipients delivered excepted
                # RQ's last try: the sender must hear of them rather than nobody
                log.exception("cannot schedule the next attempt; reporting %d recipient(s)",
                              len(later))
                final.update({r: refused[r] for r in later})
            else:
                settle(later)
                outcome += f", {len(later)} deferred again until {due.isoformat()}"
    if final and mail_from and mail_from != "<>":
        # A job of its own, with RQ's retries: the report goes through the same next hop,
        # which may well be down now.
        head, _ = header_block(data)
        enqueue_delivery_report(redis, mail_from, final, head, arrival_iso,
                                config["SMTP_HOSTNAME"])
        outcome += f", reporting {len(final)} to the sender"
    settle(list(final))
    return outcome


def import_newly_registered(due: str | None = None, path: str | None = None) -> str:
    """Load ``NEWLY_REGISTERED_LIST`` (or ``path``) into Redis; the daily job."""
    config = context.config()
    path = path or (config.get("NEWLY_REGISTERED_LIST") or "").strip()
    if not path:
        return "no NEWLY_REGISTERED_LIST configured"
    now = time.time()
    try:
        result = import_file(context.redis_client(), path, registered_at=now, now=now)
    except OSError as exc:  # a missing feed is the operator's to fix, not RQ's to retry
        log.error("cannot import the newly registered domains list %s: %s", path, exc)
        return f"cannot read {path}: {exc}"
    log.info("imported %s: %d domains, %d lines skipped, %d expired", path, result.added,
             result.skipped, result.dropped)
    return f"{result.added} domains imported, {result.skipped} skipped, {result.dropped} expired"
