"""Which addresses a domain's notices may go to: its own, or ones confirmed by a link.

A domain admin is a customer, and sets where its abuse reports, lock alerts and lock notices
go (Outgoing > Settings, a user's Contact email). Those mails come from the provider, through
the provider's next hop, and an abuse report carries the quarantined message whole: an
address anywhere would let a customer have the provider mail its spam, or its lock template's
text, to whoever it likes. So an address of the domain itself is used at once, and any other
only once someone there has opened the link mailed to it and confirmed (double opt-in, as a
mailing list does). A super admin's address is the provider's choice and counts as confirmed.
"""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from outgoing.models import ConfirmedAddress, Domain, utcnow
from outgoing.users import normalise_domain
from scoring.address import canonical_local_part, split_mailbox

# A local part mail may be sent to without a confirmation: an ASCII dot-atom without "%" and
# "!", which some next hops still read as a route to another host (user%host@, host!user@).
_LOCAL_PART = re.compile(r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9#$&'*+/=?^_`{|}~-]+)*")


def own_domain_address(value: str | None, domain_name: str) -> str | None:
    """``value`` as an address of the domain ``domain_name`` itself (not a subdomain), spelled
    with that domain in lower-case IDNA form so the next hop can route it nowhere else; None
    when it is not one."""
    local, at, domain = (value or "").strip().rpartition("@")
    if not at or len(local) > 64 or not _LOCAL_PART.fullmatch(local):
        return None
    try:
        own = normalise_domain(domain_name)
        if normalise_domain(domain) != own:
            return None
    except ValueError:
        return None
    return f"{local}@{own}"


def address_key(address: str) -> str:
    """How a confirmed address is stored and compared: trimmed, lower-case, its local part
    unquoted where quotes change nothing (``scoring.address``: the next hop reads
    ``"alerts"@a.test`` as ``alerts@a.test``) and its domain in IDNA form where it is a
    domain name. One mailbox, one key, however it was spelled."""
    address = address.strip()
    parts = split_mailbox(address)
    if parts is None:
        return address.lower()
    local, domain = parts
    try:
        domain = normalise_domain(domain)
    except ValueError:
        pass
    return f"{canonical_local_part(local)}@{domain}".lower()


def is_confirmed(db, domain_id: int, address: str) -> bool:
    return db.scalar(select(ConfirmedAddress.id).where(
        ConfirmedAddress.domain_id == domain_id,
        ConfirmedAddress.address == address_key(address))) is not None


def may_notify(db, domain: Domain, address: str | None) -> bool:
    """Whether the domain's notices may go to ``address``: an address of the domain itself, or
    one confirmed for it."""
    if not address or not address.strip():
        return False
    if own_domain_address(address, domain.name) is not None:
        return True
    return is_confirmed(db, domain.id, address)


def confirm(db, domain_id: int, address: str) -> bool:
    """Record ``address`` as confirmed for the domain; False when it already was. Two
    confirmations at once make one row (the unique constraint; the loser's savepoint is
    rolled back)."""
    if is_confirmed(db, domain_id, address):
        return False
    try:
        with db.begin_nested():
            db.add(ConfirmedAddress(domain_id=domain_id, address=address_key(address),
                                    confirmed_at=utcnow()))
    except IntegrityError:
        return False
    return True
