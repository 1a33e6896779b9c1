"""The mail that asks an address to confirm it wants a domain's notices
(``outgoing.notify_addresses``).

It goes only to an address the domain has set (its Abuse report address, a user's Contact
email or an address username) that is not confirmed yet; once a day an address, and at most
``DAILY_LIMIT`` a day for a domain, so the request cannot itself be a way to mail anyone
over and over. It says nothing a customer wrote: the domain's name, the address, the link.
"""

from __future__ import annotations

from sqlalchemy import or_, select

from outgoing import redis_keys
from outgoing.models import Domain, OutgoingUser, utcnow
from outgoing.notify_addresses import address_key, may_notify
from outgoing.tokens import CONFIRM_MAX_AGE, make_confirm_token
from worker import mail

DAILY_LIMIT = 10


def configured(db, domain: Domain, address: str) -> bool:
    """Whether the domain still names ``address`` for its notices."""
    key = address_key(address)
    if address_key(domain.abuse_report_address or "") == key:
        return True
    names = db.execute(select(OutgoingUser.contact_email, OutgoingUser.name).where(
        OutgoingUser.domain_id == domain.id,
        or_(OutgoingUser.contact_email.is_not(None), OutgoingUser.name.contains("@"))))
    return any(address_key(value or "") == key for row in names for value in row)


def link(config: dict, domain_id: int, address: str) -> str:
    token = make_confirm_token(config["SECRET_KEY"], domain_id=domain_id, address=address)
    return f"{config['PUBLIC_URL'].rstrip('/')}/confirm-address/{token}"


def text(domain: Domain, address: str, url: str) -> tuple[str, str]:
    subject = f"[Outbound Guard] Confirm {address} for the notices of {domain.name}"
    body = "\n".join([
        f"An administrator of {domain.name} asked that its outgoing-mail notices (abuse "
        f"reports of quarantined mail, lock alerts with unlock links and lock notices) be "
        f"sent to {address}.",
        "",
        "To agree, open this link and confirm:",
        url,
        "",
        f"The link works for {CONFIRM_MAX_AGE // 86400} days. If you did not expect this "
        "message, ignore it: nothing more is sent to this address unless it is confirmed.",
        "",
    ])
    return subject, body


def send(db, redis, config: dict, domain_id: int, address: str) -> str:
    domain = db.get(Domain, domain_id)
    if domain is None:
        return "domain gone; nothing sent"
    if may_notify(db, domain, address):
        return f"{address} needs no confirmation for {domain.name}; nothing sent"
    if not configured(db, domain, address):
        return f"{domain.name} no longer names {address}; nothing sent"
    day = utcnow().strftime("%Y%m%d")
    marker = f"confirm:{domain.id}:{address_key(address)}:{day}"
    if mail.was_sent(redis, marker):
        return f"confirmation already sent today to {address}"
    counter = redis_keys.confirmation_mails(domain.id, day)
    # An address takes its place in the day's ration once: RQ's retries of a link the next
    # hop deferred are not more links, and keep the place they had.
    place_key = f"{counter}:{address_key(address)}"
    place = redis.get(place_key)
    if place is None:
        place = redis.incr(counter)
        redis.expire(counter, 2 * 86400)
        redis.set(place_key, place, ex=2 * 86400)
    if int(place) > DAILY_LIMIT:
        return f"{domain.name} had {DAILY_LIMIT} confirmation mails today; nothing sent"
    subject, body = text(domain, address, link(config, domain.id, address))
    message = mail.compose(sender=config["NOTIFY_FROM"], to=address, subject=subject,
                           body=body)
    try:
        sent = mail.send_once(config, redis, marker, message, sender=config["NOTIFY_FROM"],
                              to=[address])
    except mail.MailRefused as exc:
        return f"confirmation refused: {exc}"
    return f"confirmation {'sent' if sent else 'already sent today'} to {address}"
