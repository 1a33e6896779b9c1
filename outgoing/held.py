"""Held mail (the Hold rung of compromise detection) and the provider-wide detection default.

A held message is stored like a quarantined one (``outgoing.storage``: body durable, then
the row) before the sender hears 250, and waits. Releasing it only marks it ``queued``; the
worker sends queued messages at the user's release pace over the normal relay path
(``worker/held_jobs.py``). States: held -> queued -> sending (claimed) -> released.
"""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy import select, update

from outgoing import redis_keys
from outgoing.models import (
    HELD,
    QUEUED,
    SENDING,
    GlobalSetting,
    HeldMessage,
    OutgoingUser,
    utcnow,
)
from outgoing.quarantine import remove_messages, store_durably
from scoring import risk

AREA = "held"

# "Compromise detection for new users" on Outgoing > Settings. Unset, new users enforce: on
# the replay benchmark's two traffic sets the ladder holds and locks no legitimate sender
# (README "Compromise detection"); a provider can still start them in shadow mode.
DETECTION_DEFAULT = "detection_default"
DEFAULT_OFF, DEFAULT_SHADOW, DEFAULT_ON = "off", "shadow", "on"
SHIPPED_DEFAULT = DEFAULT_ON
DEFAULT_CHOICES = [(DEFAULT_ON, "On"), (DEFAULT_SHADOW, "On, in shadow mode"),
                   (DEFAULT_OFF, "Off")]


def hold_message(session, store, *, domain_id: int, user_id: int, mail_from: str,
                 rcpt_tos, data: bytes, subject: str, identity: str | None,
                 client_ip: str | None, risk_value: float, signals: dict,
                 received_at: datetime | None = None) -> HeldMessage:
    """Store the body, then the row; both durable when this returns (the sender gets 250)."""
    row = HeldMessage(
        domain_id=domain_id, user_id=user_id, mail_from=mail_from[:320],
        rcpt_tos=json.dumps(list(rcpt_tos), ensure_ascii=False),
        subject=(subject or "")[:500], size=len(data),
        identity=(identity or None) and identity[:255], client_ip=client_ip,
        risk=float(risk_value), signals=json.dumps(signals), state=HELD, attempts=0,
        received_at=received_at or utcnow())
    return store_durably(session, store, row, data, AREA)


def signals_of(row: HeldMessage) -> dict:
    try:
        value = json.loads(row.signals or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def queue_release(session, rows, now: datetime | None = None) -> list[int]:
    """Mark held rows for release; returns the users whose release job should run."""
    now = now or utcnow()
    users: set[int] = set()
    for row in rows:
        if row.state == HELD:
            row.state = QUEUED
            row.queued_at = now
            if row.user_id:
                users.add(row.user_id)
    session.commit()
    return sorted(users)


def delete_held(session, config: dict, rows) -> int:
    """Delete held rows that no worker is sending right now."""
    return remove_messages(session, config, [r for r in rows if r.state != SENDING])


def claim_next(session, user_id: int, token: str, now: datetime,
               stale_before: datetime) -> HeldMessage | None:
    """Claim the oldest queued message of a user, or one whose claim went stale (its worker
    was killed). The UPDATE ... WHERE state is the lock: two workers never claim one row."""
    candidates = session.scalars(
        select(HeldMessage.id).where(
            HeldMessage.user_id == user_id,
            (HeldMessage.state == QUEUED)
            | ((HeldMessage.state == SENDING) & (HeldMessage.claimed_at < stale_before)))
        .order_by(HeldMessage.id).limit(5)).all()
    for row_id in candidates:
        done = session.execute(
            update(HeldMessage).where(
                HeldMessage.id == row_id,
                (HeldMessage.state == QUEUED)
                | ((HeldMessage.state == SENDING) & (HeldMessage.claimed_at < stale_before)))
            .values(state=SENDING, claim=token, claimed_at=now,
                    attempts=HeldMessage.attempts + 1))
        session.commit()
        if done.rowcount == 1:
            return session.get(HeldMessage, row_id)
    return None


def detection_default(session) -> str:
    row = session.get(GlobalSetting, DETECTION_DEFAULT)
    value = row.value if row is not None else SHIPPED_DEFAULT
    return value if value in (DEFAULT_OFF, DEFAULT_SHADOW, DEFAULT_ON) else SHIPPED_DEFAULT


def set_detection_default(session, value: str) -> str | None:
    """Store the default; returns the previous value when it changed."""
    before = detection_default(session)
    if value == before:
        return None
    row = session.get(GlobalSetting, DETECTION_DEFAULT)
    if row is None:
        session.add(GlobalSetting(name=DETECTION_DEFAULT, value=value))
    else:
        row.value = value
    return before


def apply_detection_default(session, user: OutgoingUser) -> None:
    """A new user's "Compromise detection" and "Shadow mode" from the provider's default."""
    value = detection_default(session)
    user.compromise_detection = value != DEFAULT_OFF
    user.detection_shadow_mode = value != DEFAULT_ON


def current_risk(redis, user_id: int, identity: str | None, now: float,
                 half_life: float) -> tuple[float, float]:
    """The identity's and the user's risk now (decayed), for the panel and the worker."""
    subject = (identity or "*").lower()
    values = redis.hmget(redis_keys.detection_state(user_id),
                         [f"{subject}|r", f"{subject}|t", "*|r", "*|t"])
    numbers = [float(v) if v is not None else 0.0 for v in values]
    return (risk.decay(numbers[0], now - numbers[1], half_life),
            risk.decay(numbers[2], now - numbers[3], half_life))
