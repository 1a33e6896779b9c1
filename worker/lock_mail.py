"""What a lock says, and to whom: the lock template to the sender, an alert to the domain.

Pure text building from loaded rows; sending and idempotency are the job's business.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from outgoing.incident import Pack
from outgoing.lock_templates import RenderedTemplate, render_lock_template
from outgoing.locks import owner_of
from outgoing.message_log import FIRST_RECIPIENTS
from outgoing.models import LOCK_AUTOMATIC, Identity, OutgoingUser, QuarantinedMessage
from outgoing.notify_addresses import own_domain_address
from scoring.incident import NETWORK_PREFIX_V4, NETWORK_PREFIX_V6
from worker.mail import one_line

log = logging.getLogger(__name__)


def describe(target: OutgoingUser | Identity) -> str:
    """``identity x of user y`` or ``Authenticating User y``: who, as an admin reads it."""
    owner = owner_of(target)
    if isinstance(target, Identity):
        return f"identity {target.value} of {owner.name}"
    return f"{owner.kind_label} {owner.name}"


def _looks_like_address(value: str | None) -> bool:
    return bool(value) and "@" in value and not any(c.isspace() for c in value)


def own_address(identity: Identity) -> str | None:
    """The identity as an address of its user's own domain, else None.

    An identity is what the sender claimed (envelope sender, a header), and a customer's user
    may claim any address: only one in the domain the user belongs to is an address the
    customer may send as (DESIGN.md "Tenancy"), so only that one is told."""
    return own_domain_address(identity.value, identity.user.domain.name)


def foreign_identity(target: OutgoingUser | Identity) -> str | None:
    """Why the notice does not go to the locked identity although it looks like an address
    (for the job's result), or None."""
    if not isinstance(target, Identity) or not _looks_like_address(target.value):
        return None
    if own_address(target) is not None:
        return None
    return (f"identity {target.value} is not an address of the user's domain "
            f"{target.user.domain.name}: not told")


def sender_address(target: OutgoingUser | Identity,
                   may_notify: Callable[[str], bool]) -> str | None:
    """Who is told of the lock: the identity if it is an address of the user's own domain,
    else the user's contact (or the username, when it is an address) that ``may_notify``
    allows (``outgoing.notify_addresses``: the domain's own, or confirmed)."""
    owner = owner_of(target)
    if isinstance(target, Identity):
        address = own_address(target)
        if address:
            return address
    for value in (owner.contact_email, owner.name):
        if _looks_like_address(value) and may_notify(value):
            return value
    return None


@dataclass(frozen=True)
class Outlook:
    """When the lock ends by itself, or why only an administrator can end it."""

    unlock_at: datetime | None
    manual_reason: str | None


def outlook(target: OutgoingUser | Identity) -> Outlook:
    owner = owner_of(target)
    used = target.automatic_unlocks_used or 0
    maximum = owner.maximum_unlocks_by_timeout or 0
    if target.lock_kind != LOCK_AUTOMATIC:
        return Outlook(None, "this lock was set by an administrator")
    if not owner.lock_timeout_minutes:
        return Outlook(None, "no lock timeout is set")
    if used >= maximum:
        return Outlook(None, f"all {maximum} automatic unlocks have been used")
    return Outlook(target.locked_at + timedelta(minutes=owner.lock_timeout_minutes), None)


def template_context(target: OutgoingUser | Identity) -> dict:
    owner = owner_of(target)
    return {
        "user": owner.name,
        "identity": target.value if isinstance(target, Identity) else "",
        "reason": target.lock_reason or "",
        "lock_time": target.locked_at,
        "unlock_time": outlook(target).unlock_at,
        "domain": owner.domain.name,
        "automatic_unlocks_used": target.automatic_unlocks_used or 0,
        "max_unlocks": owner.maximum_unlocks_by_timeout or 0,
    }


def sender_notice(target: OutgoingUser | Identity) -> RenderedTemplate:
    """The lock notice from the user's template, unless that template belongs to another
    domain than the user's (a template moved to one customer while another's user chose
    it): that customer's admin may have written it, so the default notice goes instead."""
    owner = owner_of(target)
    template = owner.lock_template
    if template is not None and template.domain_id not in (None, owner.domain_id):
        log.warning("the lock template %s of %s belongs to another domain; sending the "
                    "default notice", template.id, owner.name)
        template = None
    return render_lock_template(template.subject if template else None,
                                template.body if template else None, template_context(target))


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else "-"


def _recipients(row: QuarantinedMessage) -> str:
    try:
        rcpts = json.loads(row.rcpt_tos or "[]")
    except ValueError:
        rcpts = []
    shown = ", ".join(str(r) for r in rcpts[:5])
    return shown + (f" and {len(rcpts) - 5} more" if len(rcpts) > 5 else "")


def _seconds(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "-"


def _ranked(rows, unit: str, total: int | None = None) -> list[str]:
    lines = [f"  {one_line(row.value)}  {row.count} {unit if row.count != 1 else unit[:-1]}"
             + (f" ({one_line(', '.join(row.extra))})" if row.extra else "") for row in rows]
    if total is not None and total > len(rows):
        lines.append(f"  ... and {total - len(rows)} more")
    return lines or ["  (none)"]


def pack_lines(pack: Pack) -> list[str]:
    """The incident pack as the alert's plain-text section."""
    counts, summary = pack.counts, pack.summary
    verdicts = ", ".join(f"{name} {n}" for name, n in counts.by_verdict.items()) or "none"
    lines = [
        "Incident pack: what the message log recorded for "
        f"{pack.who} in the last 24 hours",
        f"({_when(pack.since)} to {_when(pack.generated_at)})",
        "",
        f"What triggered the lock: {pack.lock.trigger}",
    ]
    if pack.lock.locked:
        lines.append(f"Spam in the spam window before the lock: {pack.lock.spam_before_lock}")
    lines += [
        f"Transactions: {counts.transactions} ({verdicts})",
        f"Spam (quarantined): {counts.spam}",
        f"Messages accepted: {counts.accepted}",
        f"Refused transactions: {counts.refused}",
        f"Recipients: {counts.recipients}, of them refused: {counts.refused_recipients}",
        f"First message: {_seconds(pack.first_at)}",
        f"Last message:  {_seconds(pack.last_at)}",
        "",
        f"Top recipient domains (of the first {FIRST_RECIPIENTS} recipients of each "
        "transaction):",
        *_ranked(summary.recipient_domains, "recipients"),
        "Sample subjects:",
        *[f'  "{one_line(row.value)}"  {row.count} message(s)' for row in summary.subjects],
        *([] if summary.subjects else ["  (none)"]),
        "Client IP addresses:",
        *_ranked(summary.client_ips, "transactions", summary.client_ips_total),
        f"AUTH networks (/{NETWORK_PREFIX_V4}, /{NETWORK_PREFIX_V6}) and their logins:",
        *_ranked(summary.auth_networks, "transactions", summary.auth_networks_total),
        "",
        "These transactions in Log Search:",
        pack.log_search_url,
        "The full pack with sample messages (.zip):",
        pack.download_url,
    ]
    return lines


def alert(target: OutgoingUser | Identity, spam: list[QuarantinedMessage], link: str,
          link_hours: int, pack: Pack | None = None) -> tuple[str, str]:
    """Subject and body of the administrator's alert, with the incident pack when there is
    one."""
    owner = owner_of(target)
    who = describe(target)
    ahead = outlook(target)
    if ahead.unlock_at:
        until = (f"{_when(ahead.unlock_at)}, when the lock timeout expires and it is unlocked "
                 "automatically")
    else:
        until = f"a manual unlock is needed: {ahead.manual_reason}"
    lines = [
        f"Outbound Guard has locked outgoing mail from {one_line(who)} "
        f"(domain {owner.domain.name}).",
        "",
        f"Why:    {one_line(target.lock_reason or 'not recorded')}",
        f"Since:  {_when(target.locked_at)}",
        f"Until:  {until}",
        f"Automatic unlocks used: {target.automatic_unlocks_used or 0} of "
        f"{owner.maximum_unlocks_by_timeout or 0}",
        "",
    ]
    if spam:
        lines.append("The quarantined messages that led to the lock (newest first):")
        for row in spam:
            lines += [f"- {_when(row.received_at)}  from {one_line(row.mail_from or '<>')}",
                      f"  Subject: {one_line(row.subject or '(no subject)')}",
                      f"  To: {one_line(_recipients(row)) or '(none)'}"]
            if row.reason:
                lines.append(f"  Verdict: {one_line(row.reason)}")
    else:
        lines.append("No quarantined messages were recorded in the minutes before the lock.")
    lines += [
        "",
        "Unlock, after you have checked the sender (you will be asked to log in and confirm;",
        f"the link works once and for {link_hours} hours):",
        link,
        "",
    ]
    if pack is not None:
        lines += [*pack_lines(pack), ""]
    return f"[Outbound Guard] Locked: {who}", "\n".join(lines)
