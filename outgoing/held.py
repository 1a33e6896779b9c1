"""Held mail (the Hold rung of compromise detection) and the provider-wide detection default.

A held message is stored like a quarantined one (``outgoing.storage``: body durable, then
the row) before the sender hears 250, and waits. Releasing it only marks it ``queued``; the
worker sends queued messages at the user's release pace over the normal relay path
(``worker/held_jobs.py``). States: held -> queued -> sending (claimed) -> released, or
refused (no recipient took it; the sender got a delivery report), or retrying (deferred:
claimed again once its retry delay has passed). When the next hop takes some recipients and
defers others, the message is released for the ones it took and the deferred ones go on in a
row of their own (``split_off``), so every row's recipients are its own envelope.

Retention (``HELD_RETENTION_DAYS``, ``expire_finished``): released and refused rows and their
bodies go that many days after they were finished. Mail still held is never removed by
itself, because the sender was told 250: only an administrator's Release or Delete ends it.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlalchemy import case, delete, func, select, update

from outgoing import audit, redis_keys
from outgoing.models import (
    HELD,
    QUEUED,
    REFUSED,
    RELEASED,
    RETRYING,
    SENDING,
    GlobalSetting,
    HeldMessage,
    OutgoingUser,
    utcnow,
)
from outgoing.quarantine import purge_where, store_durably, stored_text
from outgoing.storage import discard_body
from scoring import risk

AREA = "held"

# "Compromise detection for new users" on Outgoing > Settings. Unset, new users start in
# shadow mode: every rung is computed and recorded ("would have"), no mail is touched, and the
# provider enforces once the records show the ladder fits its customers (DESIGN: tune before
# enforcing). The replay benchmark's legitimate sets give no false hold or lock, but they hold
# no brand-new customer's first bulk sending, which the ladder does throttle or hold.
DETECTION_DEFAULT = "detection_default"
DEFAULT_OFF, DEFAULT_SHADOW, DEFAULT_ON = "off", "shadow", "on"
SHIPPED_DEFAULT = DEFAULT_SHADOW
DEFAULT_CHOICES = [(DEFAULT_SHADOW, "On, in shadow mode"), (DEFAULT_ON, "On"),
                   (DEFAULT_OFF, "Off")]


def hold_message(session, store, *, domain_id: int, user_id: int, mail_from: str,
                 rcpt_tos, data: bytes, subject: str, identity: str | None,
                 client_ip: str | None, risk_value: float, signals: dict,
                 received_at: datetime | None = None, wanted=None) -> HeldMessage:
    """Store the body, then the row; both durable when this returns (the sender gets 250)."""
    row = HeldMessage(
        domain_id=domain_id, user_id=user_id, mail_from=mail_from[:320],
        rcpt_tos=json.dumps(list(rcpt_tos), ensure_ascii=False),
        subject=stored_text(subject or "", 500), size=len(data),
        identity=stored_text(identity or None, 255), client_ip=client_ip,
        risk=float(risk_value), signals=json.dumps(signals), state=HELD, attempts=0,
        received_at=received_at or utcnow())
    return store_durably(session, store, row, data, AREA, wanted)


def signals_of(row: HeldMessage) -> dict:
    try:
        value = json.loads(row.signals or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def queue_release(session, rows, now: datetime | None = None) -> list[int]:
    """Mark held rows for release; returns the users whose release job should run."""
    return sorted({row.user_id for row in queue_held(session, rows, now) if row.user_id})


def queue_held(session, rows, now: datetime | None = None) -> list[HeldMessage]:
    """Mark for release the rows still held, and return them. The UPDATE ... WHERE state is
    held decides, not the state read before: a row another admin (or the automatic release)
    queued meanwhile, which a worker may have sent since, is neither queued again (sent
    twice) nor counted as this release."""
    now = now or utcnow()
    queued = []
    for row in rows:
        done = session.execute(
            update(HeldMessage).where(HeldMessage.id == row.id, HeldMessage.state == HELD)
            .values(state=QUEUED, queued_at=now), execution_options={"synchronize_session": False})
        if done.rowcount == 1:
            queued.append(row)
    session.commit()
    return queued


def delete_held(session, config: dict, rows) -> int:
    """Delete held rows that no worker is sending right now. The DELETE ... WHERE state is
    not sending decides, not the state read before: a worker may have claimed the row since
    (its body would go from under it, its message relayed while the log says deleted)."""
    keys = []
    for row in rows:
        done = session.execute(
            delete(HeldMessage).where(HeldMessage.id == row.id, HeldMessage.state != SENDING),
            execution_options={"synchronize_session": False})
        if done.rowcount == 1:
            keys.append(row.storage_key)
    session.commit()
    for key in keys:
        discard_body(config, key)
    return len(keys)


def next_try_at(row: HeldMessage, delays: tuple[int, ...]) -> datetime | None:
    """When a retrying message is due again: its last attempt plus that attempt's delay
    (``delays`` from ``DEFER_RETRY_SECONDS``; the last one repeats)."""
    if row.state != RETRYING or row.claimed_at is None:
        return None
    attempt = min(max(int(row.attempts or 1), 1), len(delays))
    return row.claimed_at + timedelta(seconds=delays[attempt - 1])


def claim_next(session, user_id: int, token: str, now: datetime, stale_before: datetime,
               delays: tuple[int, ...] = (0,)) -> HeldMessage | None:
    """Claim the oldest queued message of a user, a retrying one whose delay has passed, or
    one whose claim went stale (its worker was killed). The UPDATE ... WHERE state (and, for
    a retry, WHERE attempts is still what we read) is the lock: two workers never claim one
    row. A stale claim is taken over as the same attempt (``attempts`` unchanged): that
    attempt may have relayed before it failed, which the worker's note of it says."""
    waiting = ((HeldMessage.state == QUEUED)
               | ((HeldMessage.state == SENDING) & (HeldMessage.claimed_at < stale_before)))
    candidates = [(row_id, waiting) for row_id in session.scalars(
        select(HeldMessage.id).where(HeldMessage.user_id == user_id, waiting)
        .order_by(HeldMessage.id).limit(5)).all()]
    retrying = session.scalars(select(HeldMessage).where(
        HeldMessage.user_id == user_id, HeldMessage.state == RETRYING)
        .order_by(HeldMessage.claimed_at).limit(50)).all()
    for row in retrying:
        due = next_try_at(row, delays)
        if due is not None and due <= now:
            candidates.append((row.id, (HeldMessage.state == RETRYING)
                               & (HeldMessage.attempts == row.attempts)))
    for row_id, condition in sorted(candidates, key=lambda pair: pair[0]):
        done = session.execute(
            update(HeldMessage).where(HeldMessage.id == row_id, condition)
            .values(state=SENDING, claim=token, claimed_at=now,
                    attempts=case((HeldMessage.state == SENDING, HeldMessage.attempts),
                                  else_=HeldMessage.attempts + 1)))
        session.commit()
        if done.rowcount == 1:
            row = session.get(HeldMessage, row_id)
            session.refresh(row)
            return row
    return None


def split_off(store, row: HeldMessage, rcpt_tos: list[str], data: bytes,
              note: str) -> HeldMessage:
    """A retrying copy of ``row`` for the recipients the next hop deferred while it took (or
    refused for good) the others; its body is stored before the caller commits it."""
    rest = HeldMessage(
        domain_id=row.domain_id, user_id=row.user_id, mail_from=row.mail_from,
        rcpt_tos=json.dumps(list(rcpt_tos), ensure_ascii=False), subject=row.subject,
        size=row.size, identity=row.identity, client_ip=row.client_ip, risk=row.risk,
        signals=row.signals, state=RETRYING, attempts=row.attempts, queued_at=row.queued_at,
        claimed_at=row.claimed_at, last_error=note[:500], received_at=row.received_at)
    store.attach(rest, data, AREA)
    return rest


def finished_at():
    """When the worker was done with a row: released, else its last attempt (refused)."""
    return func.coalesce(HeldMessage.released_at, HeldMessage.claimed_at,
                         HeldMessage.received_at)


def retention_cutoff(config: dict, now: datetime | None = None) -> datetime | None:
    """``HELD_RETENTION_DAYS`` before ``now``, or None when it is 0 (keep everything)."""
    days = int(config.get("HELD_RETENTION_DAYS") or 0)
    return (now or utcnow()) - timedelta(days=days) if days > 0 else None


def expire_finished(session, config: dict, now: datetime | None = None) -> dict[int, int]:
    """Retention: released and refused messages finished before the cutoff go, row and body,
    with one audit event per domain. Mail still held, queued or retrying is never touched.
    Returns {domain id: messages removed}."""
    cutoff = retention_cutoff(config, now)
    if cutoff is None:
        return {}
    condition = HeldMessage.state.in_((RELEASED, REFUSED)) & (finished_at() < cutoff)
    counts = dict(session.execute(select(HeldMessage.domain_id, func.count(HeldMessage.id))
                                  .where(condition).group_by(HeldMessage.domain_id)).all())
    if not counts:
        return {}
    purge_where(session, config, HeldMessage, condition)
    for domain_id, count in sorted(counts.items()):
        audit.record(session, actor="retention", action="expire_held", target_type="held",
                     target_id=None, domain_id=domain_id, removed=count,
                     days=int(config["HELD_RETENTION_DAYS"]))
    session.commit()
    return counts


def held_past_retention(session, config: dict, now: datetime | None = None) -> int:
    """Messages still held from before the cutoff: kept for an administrator's decision."""
    cutoff = retention_cutoff(config, now)
    if cutoff is None:
        return 0
    return int(session.scalar(select(func.count(HeldMessage.id)).where(
        HeldMessage.state == HELD, HeldMessage.received_at < cutoff)) or 0)


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


def record_next_hop_answers(redis, user_id: int, identity: str | None, answered: int,
                            refused: int, now: float) -> None:
    """Count a release's final answers (recipients answered, of them refused for good) in the
    hour's answers that compromise detection's refused share reads (``proxy/detection.lua``
    KEYS[5]): mail refused on release weighs on the sender as it would have inline."""
    if answered <= 0 and refused <= 0:
        return
    key = redis_keys.detection_refusals(user_id, int(now // risk.HOUR))
    with redis.pipeline(transaction=False) as pipe:  # one key: no MULTI needed, Cluster too
        for subject in {(identity or "*").lower(), "*"}:
            if answered > 0:
                pipe.hincrby(key, f"{subject}|k", answered)
            if refused > 0:
                pipe.hincrby(key, subject, refused)
        pipe.expire(key, 7200)
        pipe.execute()
