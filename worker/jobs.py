"""RQ jobs. Each takes ids (or an ISO time), reloads what it needs, and is safe to run twice.

Jobs raise on transient failures (database, Redis, next hop unreachable or 4xx), so RQ retries
them with ``outgoing.jobs.RETRY``; a permanent refusal by the next hop is logged and returned
instead. Mail is sent at most once per purpose (``worker.mail.send_once``).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from rq.utils import import_attribute

from outgoing import incident, jobs, locks, notify_addresses
from outgoing.db import session_scope
from outgoing.models import Identity, OutgoingUser, utcnow
from outgoing.tokens import make_unlock_token
from worker import (
    abuse,
    address_confirmation,
    context,
    lock_mail,
    mail,
    message_log_jobs,
    quarantine_report,
    unlocks,
)

log = logging.getLogger(__name__)


def _load(db, kind: str, target_id: int):
    return db.get(Identity if kind == "identity" else OutgoingUser, target_id)


def unlock_link(config: dict, kind: str, target_id: int, lock_id: str) -> str:
    token = make_unlock_token(config["SECRET_KEY"], kind=kind, target_id=target_id,
                              lock_id=lock_id)
    return f"{config['PUBLIC_URL'].rstrip('/')}/unlock/{token}"


# How long the alert waits for the proxy to log the transaction that set the lock off.
LOG_SETTLE_SECONDS = 5.0


def write_log_up_to_lock(config: dict, redis, kind: str, target_id: int,
                         wait: float = LOG_SETTLE_SECONDS) -> None:
    """Write the message log's stream to the database before the incident pack reads it.

    The proxy appends a transaction's record after its reply, and the lock comes before
    that reply, so the record of the message that set the lock off may still be on its
    way: write, and while the log lacks it, write again for up to ``wait`` seconds. A log
    that cannot be written leaves the pack with what is already there."""
    sessionmaker = context.sessionmaker()
    deadline = time.monotonic() + wait
    while True:
        try:
            message_log_jobs.write_batches(
                redis, sessionmaker, consumer=message_log_jobs.consumer_name(),
                claim_idle=float(config["MESSAGE_LOG_CLAIM_IDLE_SECONDS"]), budget=1.0)
        except Exception as exc:
            log.warning("incident pack: could not write the message log first (%s)", exc)
            return
        with session_scope(sessionmaker) as db:
            target = _load(db, kind, target_id)
            done = target is None or incident.trigger_logged(
                db, target, spam_window_seconds=config["SPAM_WINDOW_SECONDS"])
        if done or time.monotonic() >= deadline:
            return
        time.sleep(0.2)


def notify_lock(kind: str, target_id: int, lock_id: str) -> str:
    """Mail the lock template to the locked sender (an identity only when it is an address of
    the user's own domain, else the user's contact) and an alert, with the incident pack, to
    the domain's contact."""
    config, redis = context.config(), context.redis_client()
    notes = []
    notice_failed: Exception | None = None
    write_log_up_to_lock(config, redis, kind, target_id)
    with session_scope(context.sessionmaker()) as db:
        target = _load(db, kind, target_id)
        if target is None or not target.locked or target.lock_id != lock_id:
            return "lock no longer current; nothing sent"
        owner = lock_mail.owner_of(target)
        sender = config["NOTIFY_FROM"]

        passed_over = lock_mail.foreign_identity(target)
        if passed_over:
            notes.append(passed_over)
        recipient = lock_mail.sender_address(
            target, lambda address: notify_addresses.may_notify(db, owner.domain, address))
        if recipient:
            notice = lock_mail.sender_notice(target)
            if notice.error:
                log.warning("lock template of %s is broken (%s); sent the default",
                            owner.name, notice.error)
            message = mail.compose(sender=sender, to=recipient, subject=notice.subject,
                                   body=notice.body)
            try:
                notes.append(_send_once(config, redis, f"{lock_id}:notice", message, sender,
                                        recipient, "notice"))
            except Exception as exc:
                # The sender picks its own address (an identity): a next hop deferring it
                # must not keep the alert and its unlock link from the domain. The notice
                # fails the job after the alert, so RQ's retry sends the notice alone.
                log.warning("lock notice to %s not sent yet (%s); sending the alert first",
                            recipient, exc)
                notice_failed = exc
        else:
            notes.append("no address to tell the sender")

        admin = (owner.domain.abuse_report_address or "").strip()
        if admin and not notify_addresses.may_notify(db, owner.domain, admin):
            notes.append(f"{admin} is not confirmed for {owner.domain.name}: no alert")
        elif admin:
            spam = locks.triggering_spam(db, target,
                                         window_seconds=config["SPAM_WINDOW_SECONDS"])
            max_age = config["UNLOCK_LINK_MAX_AGE"]
            pack = incident.build(db, target, now=utcnow(), public_url=config["PUBLIC_URL"],
                                  spam_window_seconds=config["SPAM_WINDOW_SECONDS"])
            subject, body = lock_mail.alert(target, spam,
                                            unlock_link(config, kind, target_id, lock_id),
                                            max(1, max_age // 3600), pack)
            message = mail.compose(sender=sender, to=admin, subject=subject, body=body)
            notes.append(_send_once(config, redis, f"{lock_id}:alert", message, sender, admin,
                                    "alert"))
        else:
            notes.append("the domain has no contact address for alerts")
    if notice_failed is not None:
        raise notice_failed
    return "; ".join(notes)


def _send_once(config: dict, redis, marker: str, message, sender: str, to: str,
               what: str) -> str:
    """Send ``message`` once per ``marker``; a line for the job's result either way."""
    try:
        sent = mail.send_once(config, redis, marker, message, sender=sender, to=[to])
    except mail.MailRefused as exc:
        return f"{what} refused: {exc}"
    return f"{what} {'sent' if sent else 'already sent'} to {to}"


def auto_unlock(kind: str, target_id: int, lock_id: str) -> str:
    """Lift a timed-out automatic lock, if it is still that lock and unlocks remain."""
    with session_scope(context.sessionmaker()) as db:
        target = _load(db, kind, target_id)
        if target is None:
            return "target gone"
        return unlocks.expire(db, context.redis_client(), target, lock_id, utcnow())


def sweep_expired_locks(due: str | None = None) -> str:
    """Unlock whatever expired while no auto_unlock job ran (periodic, see outgoing.jobs)."""
    config = context.config()
    with session_scope(context.sessionmaker()) as db:
        notes = unlocks.sweep(db, context.redis_client(), utcnow(),
                              token_max_age=config["UNLOCK_LINK_MAX_AGE"])
    return "; ".join(notes) or "nothing expired"


def send_abuse_report(quarantined_message_id: int) -> str:
    """Mail the RFC 5965 report of one quarantined message to its domain's abuse address."""
    with session_scope(context.sessionmaker()) as db:
        return abuse.report(db, context.redis_client(), context.config(),
                            quarantined_message_id)


def send_abuse_digest(domain_id: int, bucket_start: int) -> str:
    """The messages of one hour that were over the domain's limit of individual reports."""
    with session_scope(context.sessionmaker()) as db:
        return abuse.digest(db, context.redis_client(), context.config(), domain_id,
                            bucket_start)


def send_quarantine_reports(due: str | None = None) -> str:
    """The daily report of the 24 hours before ``due`` (ISO 8601; default now)."""
    end = (datetime.fromisoformat(due).astimezone(UTC).replace(tzinfo=None) if due
           else utcnow())
    with session_scope(context.sessionmaker()) as db:
        notes = quarantine_report.send_reports(db, context.redis_client(), context.config(),
                                               end)
    return "; ".join(notes) or "no domain wants a quarantine report"


def run_periodic(name: str, due: str) -> object:
    """One run of a periodic job: schedule the next run first, so a failure here cannot end
    the chain, then do this run's work."""
    spec = jobs.PERIODIC[name]
    jobs.schedule_periodic(context.redis_client(), name,
                           jobs.next_due(name, datetime.now(UTC)))
    return import_attribute(spec.func)(due)


def send_address_confirmation(domain_id: int, address: str) -> str:
    """Mail ``address`` the link that confirms it for the domain's notices."""
    with session_scope(context.sessionmaker()) as db:
        return address_confirmation.send(db, context.redis_client(), context.config(),
                                         domain_id, address)
