"""A read-only picture of every outgoing user, as the SMTP proxy needs it per message.

The proxy answers from memory and reloads this when the configuration version in Redis moves,
so no database query sits on the per-message path and a database outage keeps serving the
last good picture.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from outgoing.models import KIND_DOMAIN, KIND_IP, KIND_USER, Domain, OutgoingUser
from scoring.identity import CompiledRules, compile_usable_rules
from scoring.risk import Settings as DetectionSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeaderRule:
    header_name: str
    regex: str | None
    remove_header: bool


@dataclass(frozen=True)
class UserPolicy:
    id: int
    kind: str
    name: str
    domain_id: int
    domain: str
    password_hash: str | None
    identification_method: str
    headers: tuple[HeaderRule, ...]
    automatic_lock: bool
    lock_identities_automatically: bool
    limits: dict = field(hash=False)
    maximum_recipients_per_day: int | None
    dkim_selector: str | None
    quarantine_response: str
    message_archiving: bool
    block_macro_attachments: bool
    block_unwanted_attachments: bool
    reject_newly_registered_domains: bool
    reauthenticate_as: str
    reauthenticate_permitted: bool
    shared_smarthost: bool = False
    ip_family: int | None = None
    ip_first: int | None = None
    ip_last: int | None = None
    # The header rules compiled once per configuration load, not once per message.
    identity_rules: CompiledRules = field(default_factory=CompiledRules, compare=False)
    # "Compromise detection" (off unless the user's settings turn it on).
    detection: DetectionSettings = field(
        default_factory=lambda: DetectionSettings(enabled=False), compare=False)


@dataclass
class Snapshot:
    users: dict[int, UserPolicy]
    by_username: dict[str, UserPolicy]
    by_domain_login: dict[str, UserPolicy]
    ip_users: list[UserPolicy]
    domains: dict[str, int]


def _positive(value: int | None) -> int | None:
    """A limit of 0 or empty means "no limit"."""
    return value if value and value > 0 else None


def _policy(user: OutgoingUser) -> UserPolicy:
    headers = tuple(HeaderRule(h.header_name, h.regex or None, bool(h.remove_header))
                    for h in user.identification_headers)
    rules, problems = compile_usable_rules(headers)
    for problem in problems:
        log.warning("outgoing user %s: ignoring %s", user.name, problem)
    return UserPolicy(
        id=user.id, kind=user.kind, name=user.name, domain_id=user.domain_id,
        domain=user.domain.name, password_hash=user.password_hash,
        identification_method=user.identification_method,
        headers=headers,
        automatic_lock=bool(user.automatic_lock),
        lock_identities_automatically=bool(user.lock_identities_automatically),
        limits={k: v for k, v in user.limits.items() if _positive(v)},
        maximum_recipients_per_day=_positive(user.maximum_recipients_per_day),
        dkim_selector=user.dkim_selector, quarantine_response=user.quarantine_response,
        message_archiving=bool(user.message_archiving),
        block_macro_attachments=bool(user.block_macro_attachments),
        block_unwanted_attachments=bool(user.block_unwanted_attachments),
        reject_newly_registered_domains=bool(user.reject_newly_registered_domains),
        reauthenticate_as=user.reauthenticate_as,
        reauthenticate_permitted=bool(user.reauthenticate_permitted),
        shared_smarthost=bool(user.shared_smarthost),
        ip_family=user.ip_family,
        ip_first=int(user.ip_first, 16) if user.ip_first else None,
        ip_last=int(user.ip_last, 16) if user.ip_last else None,
        identity_rules=rules,
        detection=detection_settings(user),
    )


def detection_settings(user: OutgoingUser) -> DetectionSettings:
    return DetectionSettings(
        enabled=bool(user.compromise_detection), shadow=bool(user.detection_shadow_mode),
        throttle_at=float(user.detection_throttle_at or 0),
        hold_at=float(user.detection_hold_at or 0),
        lock_at=float(user.detection_lock_at or 0),
        throttle_rate=int(user.detection_throttle_rate or 0),
        new_sender_allowance=float(user.detection_new_sender_allowance or 0),
        release_pace=int(user.detection_release_pace or 1))


def load_snapshot(session) -> Snapshot:
    users = session.scalars(
        select(OutgoingUser).options(selectinload(OutgoingUser.identification_headers))
    ).unique()
    snap = Snapshot(users={}, by_username={}, by_domain_login={}, ip_users=[], domains={})
    for user in users:
        policy = _policy(user)
        snap.users[policy.id] = policy
        if policy.kind == KIND_USER:
            snap.by_username[policy.name.lower()] = policy
        elif policy.kind == KIND_DOMAIN:
            snap.by_domain_login[policy.name.lower()] = policy
        elif policy.kind == KIND_IP:
            snap.ip_users.append(policy)
    snap.domains = {d.name: d.id for d in session.scalars(select(Domain))}
    return snap
