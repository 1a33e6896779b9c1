"""The daily quarantine report: what entered each domain's outgoing quarantine, sent to the
domain's contact when the domain has it switched on."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import func, select

from outgoing.models import Domain, OutgoingUser, QuarantinedMessage
from outgoing.notify_addresses import may_notify
from worker import mail

log = logging.getLogger(__name__)

TOP_SUBJECTS = 10
TOP_ROWS = 25


def _counts(db, columns, where) -> list[tuple]:
    count = func.count(QuarantinedMessage.id)
    query = (select(*columns, count).where(*where).group_by(*columns)
             .order_by(count.desc(), *columns))
    return [tuple(row) for row in db.execute(query)]


def summarise(db, domain: Domain, start: datetime, end: datetime) -> dict | None:
    """Counts per user, per identity and the top subjects; None when nothing came in."""
    qm = QuarantinedMessage
    where = (qm.domain_id == domain.id, qm.received_at >= start, qm.received_at < end)
    total = db.scalar(select(func.count(qm.id)).where(*where)) or 0
    if not total:
        return None
    names = dict(db.execute(select(OutgoingUser.id, OutgoingUser.name)
                            .where(OutgoingUser.domain_id == domain.id)).all())

    def user_name(user_id):
        return names.get(user_id, "(removed user)") if user_id else "(unknown user)"

    return {
        "total": total,
        "users": [(user_name(uid), n) for uid, n in _counts(db, [qm.user_id], where)],
        "identities": [(user_name(uid), identity, n) for uid, identity, n
                       in _counts(db, [qm.user_id, qm.identity],
                                  (*where, qm.identity.is_not(None)))],
        "subjects": [(subject, n) for subject, n in _counts(db, [qm.subject], where)],
    }


def render(domain: Domain, summary: dict, start: datetime, end: datetime) -> tuple[str, str]:
    total = summary["total"]
    lines = [
        f"Between {start:%Y-%m-%d %H:%M} and {end:%Y-%m-%d %H:%M} UTC, {total} outgoing "
        f"message{'s' if total != 1 else ''} from {domain.name} "
        f"{'were' if total != 1 else 'was'} put into the quarantine.",
        "",
        "By outgoing user:",
        *[f"  {n:>6}  {mail.one_line(name)}" for name, n in summary["users"][:TOP_ROWS]],
        "",
        "By identity:",
        *([f"  {n:>6}  {mail.one_line(identity)}  (user {mail.one_line(name)})"
           for name, identity, n in summary["identities"][:TOP_ROWS]]
          or ["  (no identities recorded)"]),
        "",
        "Top subjects:",
        *[f"  {n:>6}  {mail.one_line(subject or '(no subject)')}"
          for subject, n in summary["subjects"][:TOP_SUBJECTS]],
        "",
        "The quarantined messages are listed in the control panel. You get this report because "
        "the quarantine report is switched on in Outgoing > Settings.",
        "",
    ]
    subject = (f"[Outbound Guard] Quarantine report for {domain.name}: {total} "
               f"message{'s' if total != 1 else ''}")
    return subject, "\n".join(lines)


def send_reports(db, redis, config: dict, end: datetime) -> list[str]:
    """Report the 24 hours before ``end`` (naive UTC) to every domain that wants it."""
    start = end - timedelta(days=1)
    notes = []
    failed: Exception | None = None
    domains = db.scalars(select(Domain).where(Domain.quarantine_report_enabled.is_(True),
                                              Domain.abuse_report_address.is_not(None))
                         .order_by(Domain.name))
    for domain in domains:
        if not domain.abuse_report_address.strip():
            continue
        if not may_notify(db, domain, domain.abuse_report_address):
            notes.append(f"{domain.name}: {domain.abuse_report_address} is not confirmed")
            continue
        summary = summarise(db, domain, start, end)
        if summary is None:
            notes.append(f"{domain.name}: nothing quarantined")
            continue
        subject, body = render(domain, summary, start, end)
        message = mail.compose(sender=config["NOTIFY_FROM"], to=domain.abuse_report_address,
                               subject=subject, body=body)
        try:
            sent = mail.send_once(config, redis,
                                  f"quarantine-report:{domain.id}:{end:%Y%m%dT%H%M}", message,
                                  sender=config["NOTIFY_FROM"],
                                  to=[domain.abuse_report_address])
        except mail.MailRefused as exc:
            notes.append(f"{domain.name}: refused ({exc})")
            continue
        except Exception as exc:
            # One domain's contact deferred (or the next hop away just then) must not hold
            # back the domains after it: the run goes on, then fails for RQ's retry, which
            # sends only what is not marked sent.
            log.warning("quarantine report of %s not sent yet (%s)", domain.name, exc)
            notes.append(f"{domain.name}: not sent yet ({exc})")
            failed = failed or exc
            continue
        notes.append(f"{domain.name}: {'sent' if sent else 'already sent'}")
    if failed is not None:
        raise failed
    return notes
