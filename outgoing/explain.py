"""The "Why?" panel's facts: why a sender is throttled, held or locked, or why it would be.

Gathers, for an outgoing user or one identity of it, what every part of the product keeps
about it: the limit windows (``outgoing.usage``), the spam lock window and the compromise
detection state the proxy keeps in Redis (read here, key names in ``outgoing.redis_keys``),
the spam events in the quarantine, and the last lock and unlock in the audit log. Read only;
a Redis fault leaves the Redis parts out (None) and the rest still answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from outgoing import locks, redis_keys
from outgoing.models import AuditEvent, Identity, OutgoingUser, QuarantinedMessage
from outgoing.snapshot import detection_settings
from outgoing.usage import usage_rows
from scoring import risk
from scoring.limits import WindowUsage
from scoring.risk_readings import Standing, parse_state, standing

SPAM_EVENTS_SHOWN = 20


def read_standing(redis, user_id: int, subject: str, now: float,
                  settings: risk.Settings) -> Standing:
    """One subject's (an identity, or ``*`` for the user) detection state now: one HGETALL
    of the state hash and the next hop's answers of this hour and the last, all in the user's
    slot."""
    fields = parse_state(redis.hgetall(redis_keys.detection_state(user_id)))
    hour = int(now // risk.HOUR)
    s = subject.lower()
    now_refused, now_answered = redis.hmget(redis_keys.detection_refusals(user_id, hour),
                                            [s, f"{s}|k"])
    before_refused, before_answered = redis.hmget(
        redis_keys.detection_refusals(user_id, hour - 1), [s, f"{s}|k"])
    return standing(fields, subject, now, settings,
                    refused=(_number(now_refused), _number(before_refused)),
                    answered=(_number(now_answered), _number(before_answered)))


def _number(value) -> float:
    return float(value) if value is not None else 0.0


def spam_in_window(redis, user_id: int, identity: str | None, now: float,
                   window: float) -> int:
    """Spam events counted toward the automatic lock in the last ``window`` seconds."""
    key = redis_keys.identity_spam(user_id, identity) if identity else \
        redis_keys.user_spam(user_id)
    return int(redis.zcount(key, now - window, "+inf"))


@dataclass
class LockEvent:
    at: datetime
    actor: str
    reason: str
    kind: str | None = None
    automatic: bool = False


def _event(row: AuditEvent | None) -> LockEvent | None:
    if row is None:
        return None
    try:
        detail = json.loads(row.detail or "{}")
    except ValueError:
        detail = {}
    return LockEvent(at=row.at, actor=row.actor, reason=str(detail.get("reason") or ""),
                     kind=detail.get("kind"), automatic=bool(detail.get("automatic")))


def last_lock_events(session, target_type: str, target_id: int, domain_id: int,
                     ) -> tuple[LockEvent | None, LockEvent | None]:
    """The last lock and the last unlock of the target, from the audit log."""
    found = []
    for action in ("lock", "unlock"):
        found.append(_event(session.scalar(
            select(AuditEvent).where(AuditEvent.domain_id == domain_id,
                                     AuditEvent.target_type == target_type,
                                     AuditEvent.target_id == target_id,
                                     AuditEvent.action == action)
            .order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(1))))
    return found[0], found[1]


def spam_events(session, target: OutgoingUser | Identity, *, now: datetime,
                window_seconds: int) -> list[QuarantinedMessage]:
    """Spam of the target in the current window, newest first; for a locked target, the
    window before its lock (what locked it)."""
    if target.locked and target.locked_at is not None:
        return locks.triggering_spam(session, target, window_seconds=window_seconds,
                                     limit=SPAM_EVENTS_SHOWN)
    return locks.spam_between(session, target, now - timedelta(seconds=window_seconds),
                              limit=SPAM_EVENTS_SHOWN)


@dataclass
class Explanation:
    user: OutgoingUser
    identity: Identity | None
    settings: risk.Settings
    spam_window: int  # seconds
    spam_threshold: int
    usage: list[tuple[WindowUsage, float | None]] | None = None
    spam_count: int | None = None
    standing: Standing | None = None  # the identity's, or the user's on a user's panel
    user_standing: Standing | None = None  # the user's, on an identity's panel
    spam: list[QuarantinedMessage] = field(default_factory=list)
    last_lock: LockEvent | None = None
    last_unlock: LockEvent | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def target(self) -> OutgoingUser | Identity:
        return self.identity if self.identity is not None else self.user

    @property
    def rung(self) -> str:
        rungs = [s.rung for s in (self.standing, self.user_standing) if s is not None]
        top = risk.OBSERVE
        for rung in rungs:
            top = risk.higher(top, rung)
        return top


def explain(session, redis, target: OutgoingUser | Identity, *, now: float, config) -> Explanation:
    """Everything the panel shows for ``target`` at ``now`` (epoch seconds)."""
    identity = target if isinstance(target, Identity) else None
    user = identity.user if identity is not None else target
    settings = replace(detection_settings(user),
                       half_life=float(config.get("DETECTION_HALF_LIFE_SECONDS", 3600)))
    out = Explanation(user=user, identity=identity, settings=settings,
                      spam_window=int(config.get("SPAM_WINDOW_SECONDS", 600)),
                      spam_threshold=int(config.get("SPAM_LOCK_THRESHOLD", 5)))
    try:
        out.usage = usage_rows(redis, user, now)
        out.spam_count = spam_in_window(redis, user.id, identity.value if identity else None,
                                        now, out.spam_window)
        if identity is not None:
            out.standing = read_standing(redis, user.id, identity.value, now, settings)
            out.user_standing = read_standing(redis, user.id, "*", now, settings)
        else:
            out.standing = read_standing(redis, user.id, "*", now, settings)
    except Exception:  # Redis down: the database's part still answers
        out.usage = out.spam_count = out.standing = out.user_standing = None
    moment = datetime.fromtimestamp(now, UTC).replace(tzinfo=None)
    out.spam = spam_events(session, target, now=moment, window_seconds=out.spam_window)
    out.last_lock, out.last_unlock = last_lock_events(
        session, "identity" if identity is not None else "user", target.id, user.domain_id)
    out.reasons = reasons(out)
    return out


def reasons(e: Explanation) -> list[str]:
    """The answer in sentences, most binding first; one sentence when nothing holds it."""
    out = []
    what = "This identity" if e.identity is not None else "This user"
    if e.target.locked:
        out.append(f"{what} is locked ({e.target.lock_kind or 'manual'}): "
                   f"{e.target.lock_reason or 'no reason given'}.")
    if e.identity is not None and e.user.locked:
        out.append(f"Its outgoing user {e.user.name} is locked: "
                   f"{e.user.lock_reason or 'no reason given'}.")
    for row, resets_in in e.usage or []:
        if row.limit is not None and row.remaining == 0:
            name = "recipients per day" if row.window == "recipients" else \
                f"connections per {row.window}"
            out.append(f"The user is at its limit of {row.limit:,} {name}; "
                       "further mail is refused for now (4xx, the sender retries)"
                       + (f" until it resets in {_minutes(resets_in)}." if resets_in else "."))
    if e.spam_count is not None and e.spam_threshold and (
            e.user.lock_identities_automatically if e.identity is not None
            else e.user.automatic_lock):
        left = e.spam_threshold - e.spam_count
        if 0 < left <= 2:
            out.append(f"{e.spam_count} spam message(s) in the last {_minutes(e.spam_window)}: "
                       f"{left} more lock(s) it automatically.")
    rung = e.rung
    if rung != risk.OBSERVE:
        verb = {risk.THROTTLE: "throttled", risk.HOLD: "held", risk.LOCK: "locked"}[rung]
        if not e.settings.enabled:
            out.append(f"Its risk has reached the {rung} rung, but compromise detection is "
                       "off for this user: nothing happens.")
        elif e.settings.shadow:
            out.append(f"Its risk has reached the {rung} rung: it would be {verb}, but "
                       "shadow mode only records this.")
        else:
            out.append(f"Its risk has reached the {rung} rung: its mail is {verb}.")
    if not out:
        out.append(f"Nothing holds {what.lower()} back now.")
    return out


def _minutes(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min"
    return f"{seconds} s"
