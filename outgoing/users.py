"""Domains and outgoing users: the rules every caller (panel, CLI, tests) shares.

Creating a user checks what identifies it (IP/range, username, domain) against the database;
``apply_settings`` changes its settings and returns the before/after difference for the audit
log. Form-level checks (password strength, number ranges) live with the forms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sqlalchemy import select, update

from outgoing.models import (
    KIND_DOMAIN,
    KIND_IP,
    KIND_USER,
    Domain,
    IdentificationHeader,
    Identity,
    OutgoingUser,
)
from outgoing.passwords import hash_password
from scoring.ipranges import IpRange, overlaps, parse_ip_range
from scoring.limits import CONNECTION_WINDOWS

# The settings a panel user edits, by column name (the same word as the form field).
SETTINGS = (
    "identification_method", "automatic_lock", "lock_identities_automatically",
    "lock_timeout_minutes", "maximum_unlocks_by_timeout", "lock_template_id",
    "connection_limits_enabled", "limit_per_month", "limit_per_week", "limit_per_day",
    "limit_per_hour", "limit_per_minute", "dkim_selector", "maximum_recipients_per_day",
    "quarantine_response", "message_archiving", "block_macro_attachments",
    "block_unwanted_attachments", "reject_newly_registered_domains", "reauthenticate_as",
    "reauthenticate_permitted",
)
LIMIT_FIELDS = tuple(f"limit_per_{window}" for window in CONNECTION_WINDOWS)  # month..minute
NAME_FIELD = {KIND_IP: "ip_range", KIND_USER: "username", KIND_DOMAIN: "domain"}


class UserError(ValueError):
    """A user-facing reason why an outgoing user cannot be created or changed as asked."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def normalise_domain(name: str) -> str:
    """Lower-case IDNA form of a domain name; raises ValueError when it is not one."""
    name = (name or "").strip().rstrip(".").lower()
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


def overlapping_user(session, domain_id: int, ip_range: IpRange,
                     exclude_id: int | None = None) -> OutgoingUser | None:
    """An IP user of the domain whose range shares an address with ``ip_range``.

    Ranges of one domain never overlap, so at most a few rows start before our end and end
    after our start; the (family, first) index finds them."""
    query = select(OutgoingUser).where(
        OutgoingUser.domain_id == domain_id, OutgoingUser.kind == KIND_IP,
        OutgoingUser.ip_family == ip_range.family,
        OutgoingUser.ip_first <= f"{ip_range.last:032x}",
        OutgoingUser.ip_last >= f"{ip_range.first:032x}")
    if exclude_id is not None:
        query = query.where(OutgoingUser.id != exclude_id)
    for other in session.scalars(query.limit(20)):
        if overlaps(ip_range, ip_range_of(other)):
            return other
    return None


def _check_username(name: str) -> str:
    name = (name or "").strip().lower()
    if not name:
        raise UserError("username", "Enter a username.")
    if len(name) > 320:
        raise UserError("username", "A username is at most 320 characters.")
    if any(c.isspace() or not c.isprintable() for c in name):
        raise UserError("username", "A username cannot contain spaces or control characters.")
    return name


def identifying_fields(session, *, domain: Domain, kind: str, name: str) -> dict:
    """What identifies a new user of ``kind`` (name, IP columns), or UserError saying why
    it cannot be added: malformed, overlapping another range of the domain, or taken."""
    fields: dict = {}
    if kind == KIND_IP:
        try:
            ip_range = parse_ip_range(name)
        except ValueError as exc:
            raise UserError("ip_range", str(exc)) from None
        other = overlapping_user(session, domain.id, ip_range)
        if other is not None:
            raise UserError("ip_range", f"{ip_range} overlaps {other.name}, which "
                                        f"{domain.name} already has.")
        fields.update(name=str(ip_range), ip_family=ip_range.family,
                      ip_first=f"{ip_range.first:032x}", ip_last=f"{ip_range.last:032x}")
    elif kind == KIND_USER:
        fields["name"] = _check_username(name)
        if "@" in fields["name"]:
            fields["contact_email"] = fields["name"]
        if session.scalar(select(OutgoingUser.id).where(OutgoingUser.kind == KIND_DOMAIN,
                                                        OutgoingUser.name == fields["name"])):
            raise UserError("username", f"{fields['name']} is the login of an "
                                        "Authenticating Domain; choose another username.")
    elif kind == KIND_DOMAIN:
        fields["name"] = domain.name
        if session.scalar(select(OutgoingUser.id).where(OutgoingUser.kind == KIND_USER,
                                                        OutgoingUser.name == domain.name)):
            raise UserError("domain", f"An Authenticating User is called {domain.name}; "
                                      "its login would clash with this domain's.")
    else:
        raise UserError("kind", f"Unknown user type {kind!r}.")
    if session.scalar(select(OutgoingUser.id).where(OutgoingUser.kind == kind,
                                                    OutgoingUser.name == fields["name"])):
        what = {KIND_IP: "This IP/Range", KIND_USER: "This username",
                KIND_DOMAIN: "This domain"}[kind]
        raise UserError(NAME_FIELD[kind], f"{what} ({fields['name']}) already exists.")
    return fields


def create_outgoing_user(session, *, domain: Domain, kind: str, name: str,
                         password: str | None = None, **settings) -> OutgoingUser:
    """Validate and add an outgoing user with defaults (the panel's "Add")."""
    fields = identifying_fields(session, domain=domain, kind=kind, name=name)
    user = OutgoingUser(domain=domain, kind=kind, **fields, **settings)
    if kind in (KIND_USER, KIND_DOMAIN):
        if not password:
            raise UserError("password", "Enter a password.")
        user.password_hash = hash_password(password)
    session.add(user)
    session.flush()
    return user


def limit_order_problem(limits: Mapping[str, int | None]) -> tuple[str, str] | None:
    """(field, message) when a longer window allows fewer connections than a shorter one.

    ``limits`` maps ``limit_per_<window>`` to a number or None (no limit for that window)."""
    windows = list(CONNECTION_WINDOWS)  # month, week, day, hour, minute
    for i, longer in enumerate(windows):
        value = limits.get(f"limit_per_{longer}")
        if value is None:
            continue
        for shorter in windows[i + 1:]:
            other = limits.get(f"limit_per_{shorter}")
            if other is not None and value < other:
                return (f"limit_per_{longer}",
                        f"Limit per {longer} ({value}) is below Limit per {shorter} "
                        f"({other}); a longer period must allow at least as many.")
    return None


def settings_of(user: OutgoingUser) -> dict:
    """Every setting as plain values, for the audit log's before/after."""
    values = {name: getattr(user, name) for name in SETTINGS}
    values["domain"] = user.domain.name if user.domain else None
    values["identification_headers"] = [
        [h.header_name, h.regex or "", bool(h.remove_header)]
        for h in user.identification_headers
    ]
    return values


def difference(before: Mapping, after: Mapping) -> dict:
    """{setting: [before, after]} for what changed."""
    return {key: [before.get(key), after.get(key)] for key in after
            if before.get(key) != after.get(key)}


def apply_settings(session, user: OutgoingUser, values: Mapping, *,
                   headers: Iterable[tuple[str, str | None, bool]] | None = None,
                   domain: Domain | None = None, password: str | None = None) -> dict:
    """Change ``user``'s settings; returns {setting: [before, after]} of what changed.

    A new ``domain`` is checked like a new user would be (an IP range must not overlap the
    ranges of its new domain). ``password`` None keeps the old one."""
    before = settings_of(user)
    if domain is not None and domain.id != user.domain_id:
        if user.kind == KIND_DOMAIN:
            raise UserError("domain", "An Authenticating Domain cannot move to another domain.")
        ip_range = ip_range_of(user)
        if ip_range is not None:
            other = overlapping_user(session, domain.id, ip_range, exclude_id=user.id)
            if other is not None:
                raise UserError("domain", f"{user.name} overlaps {other.name}, which "
                                          f"{domain.name} already has.")
        user.domain = domain
        user.domain_id = domain.id
        session.execute(update(Identity).where(Identity.user_id == user.id)
                        .values(domain_id=domain.id))
    for name in SETTINGS:
        if name in values:
            setattr(user, name, values[name])
    if headers is not None:
        user.identification_headers = [
            IdentificationHeader(position=i, header_name=name.strip(), regex=regex or None,
                                 remove_header=bool(remove))
            for i, (name, regex, remove) in enumerate(headers)
        ]
    session.flush()
    changes = difference(before, settings_of(user))
    if password:
        user.password_hash = hash_password(password)
        changes["password"] = ["(unchanged)", "(changed)"]
    return changes
