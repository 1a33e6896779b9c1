"""Creating domains and outgoing users: the rules every caller (panel, CLI, tests) shares."""

from __future__ import annotations

from sqlalchemy import select

from outgoing.models import KIND_DOMAIN, KIND_IP, KIND_USER, Domain, OutgoingUser
from outgoing.passwords import hash_password
from scoring.ipranges import IpRange, overlaps, parse_ip_range


class UserError(ValueError):
    """A user-facing reason why an outgoing user cannot be created as asked."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def normalise_domain(name: str) -> str:
    """Lower-case IDNA form of a domain name; raises ValueError when it is not one."""
    name = name.strip().rstrip(".").lower()
    if not name or len(name) > 253:
        raise ValueError("Enter a domain name such as example.com.")
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{name!r} is not a valid domain name.") from None
    labels = ascii_name.split(".")
    if len(labels) < 2 or not all(
        0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-"
        and all(c.isalnum() or c == "-" for c in label) for label in labels
    ):
        raise ValueError(f"{name!r} is not a valid domain name.")
    return ascii_name


def get_or_create_domain(session, name: str) -> Domain:
    name = normalise_domain(name)
    domain = session.scalar(select(Domain).where(Domain.name == name))
    if domain is None:
        domain = Domain(name=name)
        session.add(domain)
        session.flush()
    return domain


def ip_range_of(user: OutgoingUser) -> IpRange | None:
    if user.kind != KIND_IP or not user.ip_first:
        return None
    return IpRange(user.ip_family, int(user.ip_first, 16), int(user.ip_last, 16))


def create_outgoing_user(session, *, domain: Domain, kind: str, name: str,
                         password: str | None = None, **settings) -> OutgoingUser:
    """Validate and add an outgoing user with defaults (the panel's "Add")."""
    user = OutgoingUser(domain=domain, kind=kind, **settings)
    if kind == KIND_IP:
        try:
            ip_range = parse_ip_range(name)
        except ValueError as exc:
            raise UserError("ip_range", str(exc)) from None
        candidates = session.scalars(select(OutgoingUser).where(
            OutgoingUser.domain_id == domain.id, OutgoingUser.kind == KIND_IP,
            OutgoingUser.ip_family == ip_range.family,
            OutgoingUser.ip_first <= f"{ip_range.last:032x}",
            OutgoingUser.ip_last >= f"{ip_range.first:032x}"))
        for other in candidates:
            if overlaps(ip_range, ip_range_of(other)):
                raise UserError("ip_range", f"{ip_range} overlaps {other.name}, "
                                            f"already in {domain.name}.")
        user.name = str(ip_range)
        user.ip_family = ip_range.family
        user.ip_first = f"{ip_range.first:032x}"
        user.ip_last = f"{ip_range.last:032x}"
    elif kind == KIND_USER:
        user.name = name.strip().lower()
        if not user.name or len(user.name) > 320 or any(c.isspace() for c in user.name):
            raise UserError("username", "Enter a username without spaces.")
        if "@" in user.name:
            user.contact_email = user.name
    elif kind == KIND_DOMAIN:
        user.name = domain.name
    else:
        raise UserError("kind", f"Unknown user type {kind!r}.")
    if session.scalar(select(OutgoingUser.id).where(OutgoingUser.kind == kind,
                                                    OutgoingUser.name == user.name)):
        field = {KIND_IP: "ip_range", KIND_USER: "username", KIND_DOMAIN: "domain"}[kind]
        raise UserError(field, f"{user.name} already exists.")
    if kind in (KIND_USER, KIND_DOMAIN):
        if not password:
            raise UserError("password", "Enter a password.")
        user.password_hash = hash_password(password)
    session.add(user)
    session.flush()
    return user
