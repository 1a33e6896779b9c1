"""Domains and outgoing users: the rules every caller (panel, CLI, tests) shares.

Creating a user checks what identifies it (IP/range, username, domain) against the database;
``apply_settings`` changes its settings and returns the before/after difference for the audit
log. Form-level checks (password strength, number ranges) live with the forms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sqlalchemy import and_, or_, select, update

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
from scoring.address import a_label_domain, split_mailbox
from scoring.ipranges import IpRange, parse_ip_range, whole_space_problem, width_problem
from scoring.limits import CONNECTION_WINDOWS

# The settings a panel user edits, by column name (the same word as the form field).
SETTINGS = (
    "identification_method", "automatic_lock", "lock_identities_automatically",
    "lock_timeout_minutes", "maximum_unlocks_by_timeout", "lock_template_id",
    "connection_limits_enabled", "limit_per_month", "limit_per_week", "limit_per_day",
    "limit_per_hour", "limit_per_minute", "dkim_selector", "maximum_recipients_per_day",
    "quarantine_response", "message_archiving", "block_macro_attachments",
    "block_unwanted_attachments", "reject_newly_registered_domains", "reauthenticate_as",
    "reauthenticate_permitted", "shared_smarthost", "contact_email",
    "compromise_detection", "detection_shadow_mode", "detection_throttle_at",
    "detection_hold_at", "detection_lock_at", "detection_throttle_rate",
    "detection_new_sender_allowance", "detection_release_pace",
)
LIMIT_FIELDS = tuple(f"limit_per_{window}" for window in CONNECTION_WINDOWS)  # month..minute
NAME_FIELD = {KIND_IP: "ip_range", KIND_USER: "username", KIND_DOMAIN: "domain"}


class UserError(ValueError):
    """A user-facing reason why an outgoing user cannot be created or changed as asked.

    ``needs_confirm``: a super admin may go ahead after confirming (an overlap with another
    domain's range)."""

    def __init__(self, field: str, message: str, *, needs_confirm: bool = False):
        super().__init__(message)
        self.field = field
        self.needs_confirm = needs_confirm


@dataclass(frozen=True)
class Authority:
    """Who asks: the tenancy rules (DESIGN.md "Tenancy") differ for the provider's super
    admins and for a customer's domain admin, who is an untrusted party.

    ``domain_id`` None is a super admin; otherwise the one domain the admin may act in.
    ``confirm_overlap`` is a super admin's explicit yes to a range overlapping another
    domain's. ``max_prefix`` caps a customer's ranges per IP family."""

    domain_id: int | None = None
    confirm_overlap: bool = False
    max_prefix: Mapping[int, int] = field(default_factory=lambda: {4: 24, 6: 48})

    @property
    def is_super(self) -> bool:
        return self.domain_id is None

    @classmethod
    def customer(cls, domain_id: int, config: Mapping) -> Authority:
        return cls(domain_id=domain_id, max_prefix={4: int(config["MAX_CUSTOMER_RANGE_V4"]),
                                                    6: int(config["MAX_CUSTOMER_RANGE_V6"])})


PROVIDER = Authority()  # the CLI, set-up scripts: a super admin who has not confirmed


def normalise_domain(name: str) -> str:
    """Lower-case IDNA form of a domain name; raises ValueError when it is not one."""
    name = (name or "").strip().rstrip(".").lower()
    if not name or len(name) > 253:
        raise ValueError("Enter a domain name such as example.com.")
    try:
        ascii_name = name if name.isascii() else a_label_domain(name)
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


def _overlapping(ip_range: IpRange):
    """SQL: IP users whose range shares an address with ``ip_range`` (the hex columns are
    fixed-width, so text order is numeric order)."""
    first, last = f"{ip_range.first:032x}", f"{ip_range.last:032x}"
    return select(OutgoingUser).where(
        OutgoingUser.kind == KIND_IP, OutgoingUser.ip_family == ip_range.family,
        OutgoingUser.ip_first <= last, OutgoingUser.ip_last >= first)


def foreign_overlaps(session, domain_id: int, ip_range: IpRange, *,
                     exclude_id: int | None = None, limit: int = 5) -> list[OutgoingUser]:
    """IP users of other domains whose ranges share an address with ``ip_range``."""
    query = _overlapping(ip_range).where(OutgoingUser.domain_id != domain_id)
    if exclude_id is not None:
        query = query.where(OutgoingUser.id != exclude_id)
    return list(session.scalars(query.order_by(OutgoingUser.ip_first).limit(limit)))


def confirmed_overlaps(session, user: OutgoingUser) -> dict:
    """For the audit record of a new IP user: the other domains' ranges it overlaps, which
    only a super admin's confirmation let through."""
    ip_range = ip_range_of(user)
    if ip_range is None:
        return {}
    overlapped = foreign_overlaps(session, user.domain_id, ip_range, exclude_id=user.id)
    if not overlapped:
        return {}
    return {"overlap_confirmed": [f"{u.name} ({u.domain.name})" for u in overlapped]}


def partial_overlap(session, domain_id: int, ip_range: IpRange,
                    exclude_id: int | None = None) -> OutgoingUser | None:
    """An IP user of the domain whose range overlaps ``ip_range`` without nesting in it
    or around it: then "the most specific wins" would split both ranges arbitrarily."""
    first, last = f"{ip_range.first:032x}", f"{ip_range.last:032x}"
    inside = and_(OutgoingUser.ip_first >= first, OutgoingUser.ip_last <= last)
    around = and_(OutgoingUser.ip_first <= first, OutgoingUser.ip_last >= last)
    query = _overlapping(ip_range).where(OutgoingUser.domain_id == domain_id,
                                         ~or_(inside, around))
    if exclude_id is not None:
        query = query.where(OutgoingUser.id != exclude_id)
    return session.scalar(query.limit(1))


def check_range(session, domain: Domain, ip_range: IpRange, authority: Authority, *,
                exclude_id: int | None = None) -> None:
    """The tenancy rules for a range of ``domain``; raises UserError saying why not.

    Whole address space: nobody. Wider than the cap, or overlapping another domain: a
    domain admin never (the refusal does not name the other customer); a super admin
    only after confirming. Inside one domain, ranges may nest (the most specific wins)."""
    problem = whole_space_problem(ip_range)
    if problem is None and not authority.is_super:
        problem = width_problem(ip_range, authority.max_prefix)
    if problem:
        raise UserError("ip_range", problem)
    other = partial_overlap(session, domain.id, ip_range, exclude_id)
    if other is not None:
        raise UserError("ip_range", f"{ip_range} overlaps {other.name}, which {domain.name} "
                                    "already has, without lying inside it or around it. "
                                    "Ranges of one domain may nest (the most specific "
                                    "wins) but not cross.")
    foreign = foreign_overlaps(session, domain.id, ip_range, exclude_id=exclude_id)
    if not foreign:
        return
    if not authority.is_super:
        raise UserError("ip_range", f"{ip_range} overlaps addresses that another customer "
                                    "of your provider uses. Enter only your own servers' "
                                    "addresses, or ask your provider.")
    if not authority.confirm_overlap:
        names = ", ".join(f"{u.name} ({u.domain.name})" for u in foreign)
        raise UserError("ip_range", f"{ip_range} overlaps {names}. Mail from the "
                                    "overlapping addresses would go to the most specific "
                                    "range's domain. Confirm the overlap to add it anyway.",
                        needs_confirm=True)


def _check_username(name: str) -> str:
    name = (name or "").strip().lower()
    if not name:
        raise UserError("username", "Enter a username.")
    if len(name) > 320:
        raise UserError("username", "A username is at most 320 characters.")
    if any(c.isspace() or not c.isprintable() for c in name):
        raise UserError("username", "A username cannot contain spaces or control characters.")
    return name


def customer_username(name: str, domain: Domain) -> str:
    """A domain admin's new login: an address in their own domain (a bare local part gets
    ``@domain``). The refusal is the same whether or not anyone has that login."""
    local, at, host = name.rpartition("@")
    if not at:
        local, host = name, domain.name
    try:
        host = normalise_domain(host)
    except ValueError:
        host = ""
    # The local part must be one an address can have (a dot-string or a quoted string of at
    # most 64 octets): "eve@other.test@{domain}" or "<b>x</b>@{domain}" is no address of it.
    if (not local or host != domain.name or len(local.encode()) > 64
            or split_mailbox(f"{local}@{host}") != (local, host)):
        raise UserError("username", f"A username must be an address in {domain.name}, such "
                                    f"as alice@{domain.name} (or just alice).")
    return f"{local}@{host}"


def identifying_fields(session, *, domain: Domain, kind: str, name: str,
                       authority: Authority = PROVIDER) -> dict:
    """What identifies a new user of ``kind`` (name, IP columns), or UserError saying why
    it cannot be added: malformed, against the tenancy rules, or taken."""
    if not authority.is_super and domain.id != authority.domain_id:
        raise UserError("domain", "You can add users only to your own domain.")
    fields: dict = {}
    if kind == KIND_IP:
        try:
            ip_range = parse_ip_range(name)
        except ValueError as exc:
            raise UserError("ip_range", str(exc)) from None
        check_range(session, domain, ip_range, authority)
        fields.update(name=str(ip_range), ip_family=ip_range.family,
                      ip_first=f"{ip_range.first:032x}", ip_last=f"{ip_range.last:032x}")
    elif kind == KIND_USER:
        fields["name"] = _check_username(name)
        if not authority.is_super:
            fields["name"] = customer_username(fields["name"], domain)
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
                         password: str | None = None, authority: Authority = PROVIDER,
                         **settings) -> OutgoingUser:
    """Validate and add an outgoing user with defaults (the panel's "Add", the CLI)."""
    if "shared_smarthost" in settings and not authority.is_super:
        raise UserError("shared_smarthost", "Only the provider can make a shared smarthost.")
    fields = identifying_fields(session, domain=domain, kind=kind, name=name,
                                authority=authority)
    user = OutgoingUser(domain=domain, kind=kind, **fields, **settings)
    if "compromise_detection" not in settings:
        from outgoing.held import apply_detection_default

        apply_detection_default(session, user)
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
                   domain: Domain | None = None, password: str | None = None,
                   authority: Authority = PROVIDER) -> dict:
    """Change ``user``'s settings; returns {setting: [before, after]} of what changed.

    A new ``domain`` (super admins only) is checked like a new user would be: its range
    under the tenancy rules of the new domain. ``password`` None keeps the old one.
    ``shared_smarthost`` is the provider's alone."""
    if not authority.is_super and ("shared_smarthost" in values or (
            domain is not None and domain.id != user.domain_id)):
        raise UserError("domain", "Only the provider can change that.")
    before = settings_of(user)
    if domain is not None and domain.id != user.domain_id:
        if user.kind == KIND_DOMAIN:
            raise UserError("domain", "An Authenticating Domain cannot move to another domain.")
        ip_range = ip_range_of(user)
        if ip_range is not None:
            try:
                check_range(session, domain, ip_range, authority, exclude_id=user.id)
            except UserError as exc:
                raise UserError("domain", str(exc), needs_confirm=exc.needs_confirm) from None
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
