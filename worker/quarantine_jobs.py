"""RQ jobs of the outgoing quarantine and the archive: Release, and retention.

Release goes through the worker rather than the web request because the next hop may be slow
or down: RQ retries a job that failed temporarily, and the control panel stays quick. A
released message is prepared as the proxy would have relayed it (identity headers marked
"remove" dropped, DKIM-signed with the user's selector), relayed with smtplib (STARTTLS when
offered, AUTH when configured), archived when the user archives, and marked released.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from datetime import UTC, datetime

from sqlalchemy import select, update

from outgoing import audit
from outgoing.archive import archive_message, expire_archive
from outgoing.db import session_scope
from outgoing.dkim import DkimError, load_signing_key, sign_with
from outgoing.jobs import enqueue, enqueue_delivery_report
from outgoing.models import IdentificationHeader, OutgoingUser, QuarantinedMessage, utcnow
from outgoing.quarantine import expire_quarantine, recipients
from outgoing.storage import read_body, store_for
from scoring.message import header_block, parse_headers, remove_headers, subject_of
from scoring.retry import next_attempt_at, parse_delays, split_refusals
from worker import claims, context
from worker.mail import SENT, SENT_MARKER_SECONDS, ExactSMTP

log = logging.getLogger(__name__)


class RelayRefused(Exception):
    """The next hop refused every recipient permanently; retrying will not help."""


def relay_sync(config: dict, *, mail_from: str, rcpt_tos: list[str],
               data: bytes) -> dict[str, tuple[int, bytes]]:
    """Relay to ``UPSTREAM_SMTP`` like the proxy does; returns the refused recipients.

    Raises on temporary failures (so RQ retries) and :class:`RelayRefused` when nothing was
    accepted for a permanent reason.
    """
    host, _, port = config["UPSTREAM_SMTP"].rpartition(":")
    with ExactSMTP(host.strip("[]"), int(port), timeout=config["UPSTREAM_TIMEOUT"],
                      local_hostname=config["SMTP_HOSTNAME"]) as smtp:
        smtp.ehlo()
        if smtp.has_extn("starttls"):
            context_ = ssl.create_default_context()
            context_.check_hostname = False
            context_.verify_mode = ssl.CERT_NONE
            smtp.starttls(context=context_)
            smtp.ehlo()
        if config.get("UPSTREAM_USERNAME"):
            smtp.login(config["UPSTREAM_USERNAME"], config.get("UPSTREAM_PASSWORD") or "")
        options = ["SMTPUTF8"] if any(not a.isascii() for a in [mail_from, *rcpt_tos]) else []
        try:
            return smtp.sendmail(mail_from, rcpt_tos, data, mail_options=options)
        except smtplib.SMTPRecipientsRefused as exc:
            if all(code >= 500 for code, _ in exc.recipients.values()):
                raise RelayRefused(f"next hop refused every recipient: {exc.recipients}") \
                    from exc
            raise
        except smtplib.SMTPResponseException as exc:
            if exc.smtp_code >= 500:
                raise RelayRefused(f"next hop refused the message: {exc.smtp_code} "
                                   f"{exc.smtp_error!r}") from exc
            raise


def prepared_for_relay(db, user: OutgoingUser | None, data: bytes) -> bytes:
    """What the proxy would have relayed: identity headers removed, then DKIM-signed."""
    if user is None:
        return data
    names = {h.header_name for h in db.scalars(
        select(IdentificationHeader).where(IdentificationHeader.user_id == user.id))
        if h.remove_header}
    if names:
        data = remove_headers(data, names)
    if user.dkim_selector:
        key = load_signing_key(db, user.domain_id, user.dkim_selector)
        if key is not None:
            try:
                data = sign_with(data, key)
            except DkimError as exc:
                log.warning("releasing unsigned: %s", exc)
    return data


CLAIM_SECONDS = 3600


def release_quarantined(message_id: int) -> str:
    """Relay a quarantined message to the next hop and mark it released (once).

    One job at a time holds the message's claim (:mod:`worker.claims`): a worker killed
    mid-release leaves it behind, and RQ's retry of that job, or a new Release once that job
    has ended, takes it over instead of waiting out the hour. Once the next hop has taken
    the message the claim becomes "sent" (in Redis, for SENT_MARKER_SECONDS) before the
    database records it: when that commit fails (the database is away), RQ's retry or the
    next Release finds "sent" and only records the release, however long the outage. What
    is left where a retry relays again: a kill, or a Redis outage, between the next hop's
    answer and "sent" (which includes queuing the refused recipients' retry or report)."""
    config, redis = context.config(), context.redis_client()
    claim = f"og:release:{message_id}"
    with session_scope(context.sessionmaker()) as db:
        row = db.get(QuarantinedMessage, message_id)
        if row is None:
            return "message no longer in the quarantine"
        if row.released_at is not None:
            return "already released"
        if not claims.claim(redis, claim, seconds=CLAIM_SECONDS, final=_RELAYED):
            if claims.holder_of(redis, claim) not in _RELAYED:
                return "a release of this message is already under way"
            user = db.get(OutgoingUser, row.user_id) if row.user_id else None
            if not _record_release(db, config, row, user,
                                   prepared_for_relay(db, user, read_body(config, row))):
                return "already released"
            return "relayed before; its release is recorded now"
        try:
            db.refresh(row)  # another release may have ended between our read and our claim
            if row.released_at is not None:
                return "already released"
            user = db.get(OutgoingUser, row.user_id) if row.user_id else None
            stored = read_body(config, row)
            data = prepared_for_relay(db, user, stored)
            # Reports quote the stored headers, not the relayed ones: a DKIM signature made
            # anew (its t=) would make each Release's report a new one, sent again.
            head, _ = header_block(stored)
            rcpts = recipients(row)
            try:
                refused = relay_sync(config, mail_from=row.mail_from, rcpt_tos=rcpts,
                                     data=data)
            except RelayRefused as exc:
                log.warning("release of quarantined message %s refused: %s", message_id, exc)
                _after_full_refusal(db, config, redis, row, head, rcpts, exc)
                return f"not released: {exc}"
            except smtplib.SMTPRecipientsRefused as exc:  # none taken, some only for now
                refused = exc.recipients
            if refused:
                # Before "sent": a failure in between relays and reports again rather than
                # losing the recipients the next hop did not take.
                _after_partial_refusal(config, redis, row.mail_from, data, refused, head,
                                       row.received_at)
            try:  # give_back leaves "sent" alone
                redis.set(claim, SENT, ex=SENT_MARKER_SECONDS)
            except Exception:  # our commit below still records it, unless both are away
                log.exception("quarantined message %s was relayed; cannot note it in Redis",
                              message_id)
            released = _record_release(db, config, row, user, data)
        finally:
            claims.give_back(redis, claim)
    note = f"released to {len(rcpts) - len(refused)} recipient(s)"
    if refused:
        note += f"; refused: {', '.join(sorted(refused))}"
    return note if released else "already released"


_RELAYED = frozenset({SENT})


def _record_release(db, config: dict, row: QuarantinedMessage, user: OutgoingUser | None,
                    data: bytes) -> bool:
    """Mark the relayed message released and archive it when the user archives; False when
    another job recorded it first (two finishing one release archive it once)."""
    done = db.execute(update(QuarantinedMessage).where(
        QuarantinedMessage.id == row.id, QuarantinedMessage.released_at.is_(None))
        .values(released_at=utcnow()))
    db.commit()
    if done.rowcount != 1:
        return False
    if user is not None and user.message_archiving:
        try:
            archive_message(db, store_for(config), domain_id=row.domain_id,
                            user_id=user.id, mail_from=row.mail_from, rcpt_tos=recipients(row),
                            data=data, subject=subject_of(parse_headers(data)),
                            by_sender=bool(user.shared_smarthost))
        except Exception:
            log.exception("released message %s was relayed but not archived", row.id)
    return True


RETRY_JOB = "worker.content_jobs.retry_deferred_recipients"


def _refusals(exc: RelayRefused, rcpts: list[str]) -> dict[str, tuple[int, str]]:
    """Each recipient with the next hop's reply that refused it (for a refused message,
    that one reply for all)."""
    cause = exc.__cause__
    if isinstance(cause, smtplib.SMTPRecipientsRefused):
        return {rcpt: (int(code), _text(text)) for rcpt, (code, text)
                in cause.recipients.items()}
    code = int(getattr(cause, "smtp_code", 554))
    return {rcpt: (code, _text(getattr(cause, "smtp_error", str(exc)))) for rcpt in rcpts}


def _text(text) -> str:
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


def _after_full_refusal(db, config: dict, redis, row: QuarantinedMessage, head: bytes,
                        rcpts: list[str], exc: RelayRefused) -> None:
    """The next hop refused the released message for good, for every recipient. It stays in
    the quarantine (nothing went out); the sender, told 250 when it was quarantined, gets a
    delivery report, and the domain's audit log says why the release did not happen, so
    the administrator who pressed Release sees the next hop's answer. A second Release
    refused the same way reports nothing twice (the report's marker is the same)."""
    answers = _refusals(exc, rcpts)
    if row.mail_from and row.mail_from != "<>":
        enqueue_delivery_report(redis, row.mail_from, answers, head,
                                row.received_at.isoformat(), config["SMTP_HOSTNAME"])
    audit.record(db, actor="worker", action="release_refused", target_type="quarantine",
                 target_id=row.id, domain_id=row.domain_id,
                 next_hop_said="; ".join(f"{rcpt}: {code} {' '.join(text.split())}"[:300]
                                         for rcpt, (code, text) in sorted(answers.items()))
                 [:2000])
    db.commit()


def _after_partial_refusal(config: dict, redis, mail_from: str, data: bytes,
                           refused: dict[str, tuple[int, bytes]], head: bytes,
                           arrival: datetime) -> None:
    """The next hop took the released message for some recipients only: those it refused
    for now are retried (``retry_deferred_recipients``, as on the proxy's path), those it
    refused for good are reported to the sender, who was told 250 long ago. Raises when
    neither can be queued, so the job is retried rather than the recipients dropped."""
    answers = {rcpt: (int(code), text.decode("utf-8", "replace")
                      if isinstance(text, bytes) else str(text))
               for rcpt, (code, text) in refused.items()}
    final, later = split_refusals(answers)
    now = utcnow()
    if later:
        due = next_attempt_at(attempt=1, arrival=now, now=now,
                              delays=parse_delays(config["DEFER_RETRY_SECONDS"]),
                              give_up_seconds=config["DEFER_GIVE_UP_SECONDS"])
        if due is None:
            final.update(later)
        else:
            enqueue(redis, RETRY_JOB, mail_from, sorted(later), bytes(data), now.isoformat(),
                    1, at=None if due <= now else due)
    if final and mail_from and mail_from != "<>":
        enqueue_delivery_report(redis, mail_from, final, head, arrival.isoformat(),
                                config["SMTP_HOSTNAME"])


def expire_stored_messages(due: str | None = None) -> str:
    """Retention: quarantined messages after ``QUARANTINE_RETENTION_DAYS``, archived ones
    after ``ARCHIVE_RETENTION_DAYS`` (when set). Takes the periodic run's due time."""
    config = context.config()
    now = (datetime.fromisoformat(due).astimezone(UTC).replace(tzinfo=None) if due
           else utcnow())
    with session_scope(context.sessionmaker()) as db:
        quarantined = expire_quarantine(db, config, now)
        archived = expire_archive(db, config, now)
    return f"removed {quarantined} quarantined and {archived} archived message(s)"
