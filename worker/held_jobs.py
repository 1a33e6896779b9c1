"""Held mail released at a pace: by an administrator, for a whole identity, or by itself once
the sender's risk has fallen below Hold and it is not locked.

Never a flood: a user's releases share one counter per minute in Redis (``release_pace``), so
however many workers and jobs run, at most the user's "Release pace" messages leave per
minute. Never lost, never twice: a message is claimed in the database (``UPDATE ... WHERE
state``) before it is relayed and marked released in the same row right after the next hop's
250; a worker killed while relaying leaves a claim that goes stale after HELD_CLAIM_SECONDS
and is taken over. The one window left is a kill between the next hop's 250 and our commit
(microseconds); the message is then sent again rather than lost.
"""

from __future__ import annotations

import logging
import secrets
import smtplib
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from outgoing import held, redis_keys
from outgoing.db import session_scope
from outgoing.jobs import enqueue
from outgoing.models import HELD, QUEUED, RELEASED, SENDING, HeldMessage, Identity, OutgoingUser
from outgoing.quarantine import recipients
from outgoing.storage import read_body
from scoring import risk
from worker import context
from worker.quarantine_jobs import RelayRefused, prepared_for_relay, relay_sync

log = logging.getLogger(__name__)

REFUSED = "refused"  # the next hop refused it for good (kept, with the reason)
RELEASE_JOB = "worker.held_jobs.release_for_user"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _take_slot(redis, user_id: int, pace: int, now: float) -> bool:
    """One of this minute's ``pace`` release slots of the user, or False when used up."""
    key = redis_keys.release_pace(user_id, int(now // 60))
    with redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, 120)
        count = pipe.execute()[0]
    if int(count) > pace:
        return False
    return True


def _give_slot_back(redis, user_id: int, now: float) -> None:
    redis.decr(redis_keys.release_pace(user_id, int(now // 60)))


def release_for_user(user_id: int) -> str:
    """Send the user's queued held messages, at most its release pace this minute; schedules
    itself for the next minute while some remain."""
    config, redis = context.config(), context.redis_client()
    sent = failed = 0
    stale = timedelta(seconds=float(config.get("HELD_CLAIM_SECONDS", 120)))
    with session_scope(context.sessionmaker()) as db:
        user = db.get(OutgoingUser, user_id)
        pace = max(int(user.detection_release_pace or 1), 1) if user else 1
        while True:
            now = time.time()
            if not _take_slot(redis, user_id, pace, now):
                break
            token = secrets.token_hex(8)
            row = held.claim_next(db, user_id, token, _now(), _now() - stale)
            if row is None:
                _give_slot_back(redis, user_id, now)
                break
            if _send(db, config, user, row, token):
                sent += 1
            else:
                failed += 1
        remaining = db.scalar(select(HeldMessage.id).where(
            HeldMessage.user_id == user_id,
            HeldMessage.state.in_((QUEUED, SENDING))).limit(1))
    if remaining is not None:
        due = datetime.fromtimestamp((int(time.time() // 60) + 1) * 60, UTC)
        enqueue(redis, RELEASE_JOB, user_id, at=due.replace(tzinfo=None),
                job_id=f"og-release-{user_id}-{int(due.timestamp())}", retry=None)
    return f"released {sent}, failed {failed}" + (", more next minute" if remaining else "")


def _send(db, config: dict, user, row: HeldMessage, token: str) -> bool:
    """Relay one claimed message over the normal path; True when the next hop took it."""
    try:
        data = prepared_for_relay(db, user, read_body(config, row))
        refused = relay_sync(config, mail_from=row.mail_from, rcpt_tos=recipients(row),
                             data=data)
    except RelayRefused as exc:
        _finish(db, row, token, REFUSED, str(exc))
        log.warning("held message %s refused by the next hop: %s", row.id, exc)
        return False
    except (OSError, smtplib.SMTPException) as exc:
        _finish(db, row, token, QUEUED, f"will retry: {exc}")  # deferred: next run
        log.warning("held message %s not released yet: %s", row.id, exc)
        return False
    note = f"refused: {', '.join(sorted(refused))}" if refused else None
    _finish(db, row, token, RELEASED, note)
    return True


def _finish(db, row: HeldMessage, token: str, state: str, note: str | None) -> None:
    db.refresh(row)
    if row.claim != token:  # our claim went stale and someone else took it over
        return
    row.state = state
    row.last_error = (note or None) and note[:500]
    if state == RELEASED:
        row.released_at = _now()
    db.commit()


def release_when_calm(due: str | None = None) -> str:
    """The periodic automatic release: held mail of senders whose risk has decayed below
    their Hold threshold and that are not locked goes to the paced release; users with
    queued mail (or a stale claim) get their release job."""
    config, redis = context.config(), context.redis_client()
    half_life = float(config.get("DETECTION_HALF_LIFE_SECONDS", 3600))
    now = time.time()
    users: set[int] = set()
    with session_scope(context.sessionmaker()) as db:
        pairs = db.execute(select(HeldMessage.user_id, HeldMessage.identity).where(
            HeldMessage.state == HELD, HeldMessage.user_id.is_not(None)).distinct()).all()
        for user_id, identity in pairs:
            user = db.get(OutgoingUser, user_id)
            if user is None or user.locked or _identity_locked(db, user_id, identity):
                continue
            identity_risk, user_risk = held.current_risk(redis, user_id, identity, now,
                                                         half_life)
            hold_at = float(user.detection_hold_at or 0)
            if hold_at and max(identity_risk, user_risk) >= hold_at:
                continue
            rows = db.scalars(select(HeldMessage).where(
                HeldMessage.user_id == user_id, HeldMessage.identity == identity,
                HeldMessage.state == HELD)).all()
            users.update(held.queue_release(db, rows))
            log.info("automatic release of %d held message(s) of %s (%s): risk %.1f",
                     len(rows), user.name, identity, max(identity_risk, user_risk))
        users.update(db.scalars(select(HeldMessage.user_id).where(
            HeldMessage.state.in_((QUEUED, SENDING))).distinct()).all())
    for user_id in sorted(u for u in users if u is not None):
        release_for_user(user_id)
    return f"released held mail of {len(users)} user(s)"


def _identity_locked(db, user_id: int, identity: str | None) -> bool:
    if not identity:
        return False
    return bool(db.scalar(select(Identity.locked).where(
        Identity.user_id == user_id, Identity.value == identity)))


__all__ = ["release_for_user", "release_when_calm", "risk"]
