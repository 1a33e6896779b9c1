"""Locking and unlocking outgoing users and identities.

The database row is the record (with an audit event); the Redis key is what every proxy
instance checks on the next message. Both are written here, by the one function each process
calls, so the web app, the proxy and the worker cannot disagree about what a lock is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from datetime import datetime, timedelta

from sqlalchemy import func, select

from outgoing import audit, jobs, metrics, redis_keys
from outgoing.models import LOCK_AUTOMATIC, Identity, OutgoingUser, QuarantinedMessage, utcnow

log = logging.getLogger(__name__)


def _lock_key(target: OutgoingUser | Identity) -> str:
    if isinstance(target, Identity):
        return redis_keys.identity_lock(target.user_id, target.value)
    return redis_keys.user_lock(target.id)


def kind_of(target: OutgoingUser | Identity) -> str:
    return "identity" if isinstance(target, Identity) else "user"


def _domain_id(target: OutgoingUser | Identity) -> int:
    return target.user.domain_id if isinstance(target, Identity) else target.domain_id


def owner_of(target: OutgoingUser | Identity) -> OutgoingUser:
    return target.user if isinstance(target, Identity) else target


def lock(session, redis, target: OutgoingUser | Identity, *, kind: str, reason: str,
         actor: str, now: datetime | None = None, claim_in_redis: bool = True) -> str | None:
    """Lock ``target``; return the new lock id, or None when it was locked already.

    With ``claim_in_redis`` the Redis key is set only if absent, so two proxy instances that
    see the fifth spam at the same moment lock once, not twice.
    """
    now = now or utcnow()
    lock_id = uuid.uuid4().hex
    value = json.dumps({"lock_id": lock_id, "reason": reason, "kind": kind,
                        "at": now.isoformat()})
    key = _lock_key(target)
    if claim_in_redis:
        if not redis.set(key, value, nx=True):
            return None
    else:
        redis.set(key, value)
    target.locked = True
    target.lock_kind = kind
    target.lock_reason = reason[:500]
    target.locked_at = now
    target.lock_id = lock_id
    audit.record(session, actor=actor, action="lock", target_type=kind_of(target),
                 target_id=target.id, domain_id=_domain_id(target), reason=reason, kind=kind,
                 lock_id=lock_id)
    session.commit()
    metrics.count(redis, f"locks:{kind_of(target)}:{kind}")
    jobs.enqueue(redis, "worker.jobs.notify_lock", kind_of(target), target.id, lock_id)
    owner = owner_of(target)
    if kind == LOCK_AUTOMATIC and owner.lock_timeout_minutes:
        jobs.enqueue(redis, "worker.jobs.auto_unlock", kind_of(target), target.id, lock_id,
                     at=now + timedelta(minutes=owner.lock_timeout_minutes))
        # The sweep catches timed unlocks whose job was lost; make sure it is scheduled.
        jobs.ensure_periodic(redis)
    return lock_id


# Spam windows are minutes long; identities that spammed within this span before the lock
# still hold events that could count toward a new one.
SPAM_SENDERS_LOOKBACK = timedelta(days=1)


def _spam_keys(session, target: OutgoingUser | Identity) -> list[str]:
    """The spam windows an unlock empties: the identity's own, or the user's and those of
    its identities that sent spam lately (their events would otherwise lock the identity at
    the first spam after the user's unlock). All share the user's hash slot."""
    if isinstance(target, Identity):
        return [redis_keys.identity_spam(target.user_id, target.value)]
    since = (target.locked_at or utcnow()) - SPAM_SENDERS_LOOKBACK
    row = QuarantinedMessage
    senders = session.scalars(
        select(row.identity).where(row.user_id == target.id, row.received_at >= since,
                                   row.identity.is_not(None)).distinct())
    return [redis_keys.user_spam(target.id)] + [
        redis_keys.identity_spam(target.id, value) for value in senders]


# Delete a lock key only while it holds the lock ARGV[1] (its JSON's lock_id).
_DELETE_IF_LOCK = """
local value = redis.call("GET", KEYS[1])
if value and cjson.decode(value)["lock_id"] == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
"""


def unlock(session, redis, target: OutgoingUser | Identity, *, actor: str, reason: str,
           automatic: bool = False) -> bool:
    """Unlock ``target``; an automatic (timed) unlock counts against the maximum.

    The spam count starts afresh: without that, the events that caused the lock are still
    in the window and the next spam message locks again at once."""
    was_locked, lock_id = bool(target.locked), target.lock_id
    key, target_id = _lock_key(target), target.id  # the commit expires the row: kept here
    redis.delete(key, *_spam_keys(session, target))
    if not was_locked:
        return False
    audit.record(session, actor=actor, action="unlock", target_type=kind_of(target),
                 target_id=target.id, domain_id=_domain_id(target), reason=reason,
                 lock_id=target.lock_id, automatic=automatic)
    target.locked = False
    target.lock_kind = None
    target.lock_reason = None
    target.locked_at = None
    target.lock_id = None
    if automatic:
        target.automatic_unlocks_used = (target.automatic_unlocks_used or 0) + 1
    session.commit()
    # Once more now that the unlock is committed: a restore of the locks (after Redis lost
    # its data) that read the row before the commit may have written this lock's key back
    # since the first delete, and its own second look at the row would still have seen it
    # locked. Only this lock's: a new lock set since the commit stays.
    try:
        if lock_id:
            redis.eval(_DELETE_IF_LOCK, 1, key, lock_id)
    except Exception as exc:  # the unlock stands; only a restore that raced it could linger
        log.warning("unlocked %s %s, but could not delete its lock key again: %s",
                    kind_of(target), target_id, exc)
    metrics.count(redis, f"unlocks:{kind_of(target)}:{'timed' if automatic else 'manual'}")
    return True


def spam_between(session, target: OutgoingUser | Identity, since: datetime,
                 until: datetime | None = None, limit: int = 10) -> list[QuarantinedMessage]:
    """The quarantined messages of ``target`` received from ``since`` (to ``until``), newest
    first, filed under its user's current domain: a user the provider moved keeps its id,
    and the spam it sent before is the old domain's, not for the new domain's admin."""
    row = QuarantinedMessage
    query = select(row).where(row.domain_id == _domain_id(target), row.received_at >= since)
    if until is not None:
        query = query.where(row.received_at <= until)
    if isinstance(target, Identity):
        query = query.where(row.user_id == target.user_id, row.identity == target.value)
    else:
        query = query.where(row.user_id == target.id)
    return list(session.scalars(query.order_by(row.received_at.desc(), row.id.desc())
                                .limit(limit)))


def triggering_spam(session, target: OutgoingUser | Identity, *, window_seconds: int,
                    limit: int = 10) -> list[QuarantinedMessage]:
    """The quarantined messages of ``target`` in the spam window before its lock, newest
    first: what an administrator needs to see to judge the lock."""
    if target.locked_at is None:
        return []
    return spam_between(session, target, target.locked_at - timedelta(seconds=window_seconds),
                        target.locked_at + timedelta(seconds=60), limit)


def reset_unlock_count(session, target: OutgoingUser | Identity, *, actor: str) -> None:
    audit.record(session, actor=actor, action="reset_unlocks", target_type=kind_of(target),
                 target_id=target.id, domain_id=_domain_id(target),
                 before=target.automatic_unlocks_used)
    target.automatic_unlocks_used = 0
    session.commit()


# Delete a lock key only while it holds what the caller wrote (not a lock set since).
_DELETE_IF_UNCHANGED = """
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
"""
_IDS_PER_QUERY = 500


def restore_redis_locks(session, redis) -> int:
    """Write every lock the database holds back into Redis (after Redis lost its data).

    The mark (``LOCKS_MIRRORED``) is set first: data lost at any moment after takes the
    mark with it, so the proxy, which checks the mark, writes the locks again. A run that
    fails takes its mark away for the same reason.

    An unlock that runs meanwhile deletes its key, then commits; when that falls between
    this run's read and its write, the write brings the lock back, and the sender would be
    refused (and a new lock of it not recorded) while the panel says unlocked. So the rows
    written are read again in a new transaction, and a key whose row is no longer locked is
    taken away, if it still holds what this run wrote."""
    redis.set(redis_keys.LOCKS_MIRRORED, utcnow().isoformat())
    written: list[tuple[type, int, str, str]] = []
    locked_keys: set[str] = set()
    try:
        for model in (OutgoingUser, Identity):
            for target in session.scalars(select(model).where(model.locked.is_(True))):
                at = target.locked_at.isoformat() if target.locked_at else ""
                value = json.dumps({"lock_id": target.lock_id, "reason": target.lock_reason,
                                    "kind": target.lock_kind, "at": at})
                key = _lock_key(target)
                locked_keys.add(key)
                if redis.set(key, value, nx=True):
                    written.append((model, target.id, key, value))
        session.rollback()  # ends the read: SQLite would go on showing its snapshot
        for model, row_id, key, value in _unlocked_since(session, written):
            redis.eval(_DELETE_IF_UNCHANGED, 1, key, value)
            written.remove((model, row_id, key, value))
        _drop_stale_locks(session, redis, locked_keys)
    except BaseException:
        with contextlib.suppress(Exception):
            redis.delete(redis_keys.LOCKS_MIRRORED)
        raise
    return len(written)


# A lock key younger than this is left alone by the write-back even when the database has
# no such lock: a lock is set in Redis just before its row is committed.
STALE_LOCK_AGE = timedelta(minutes=2)
_LOCK_KEY_PATTERNS = ("og:{*}:lock", "og:{*}:idlock:*")


def _drop_stale_locks(session, redis, locked_keys: set[str]) -> None:
    """Take away lock keys the database no longer holds: a Redis restarted from an older
    snapshot, or a replica that took over before an unlock's delete reached it, brings back
    locks lifted since, and the sender would stay refused while the panel says unlocked.
    One SCAN of the lock keys (every Cluster master's); each key is read again in the
    database before it goes, and goes only if it still holds what was read."""
    for pattern in _LOCK_KEY_PATTERNS:
        for raw in redis.scan_iter(match=pattern, count=1000):
            key = raw.decode() if isinstance(raw, bytes) else raw
            if key in locked_keys:
                continue
            value = redis.get(key)
            if value is None or not _old_enough(value) or _locked_now(session, key):
                continue
            redis.eval(_DELETE_IF_UNCHANGED, 1, key, value)
            log.warning("took away the lock key %s: the database holds no such lock", key)


def _old_enough(value: bytes | str) -> bool:
    try:
        at = datetime.fromisoformat(json.loads(value)["at"])
    except (ValueError, TypeError, KeyError):
        return False  # not a lock as this code writes it: not ours to judge
    return at <= utcnow() - STALE_LOCK_AGE


def _locked_now(session, key: str) -> bool:
    """Does the database hold a lock for ``key`` (``og:{user}:lock`` or ``og:{user}:idlock:
    value``)? Unknown shapes count as locked, so they are left alone."""
    tag, _, rest = key.partition("}:")
    try:
        user_id = int(tag.removeprefix("og:{"))
    except ValueError:
        return True
    if rest == "lock":
        query = select(OutgoingUser.id).where(OutgoingUser.id == user_id,
                                              OutgoingUser.locked.is_(True))
    elif rest.startswith("idlock:"):
        query = select(Identity.id).where(
            Identity.user_id == user_id, Identity.locked.is_(True),
            func.lower(Identity.value) == rest.removeprefix("idlock:"))
    else:
        return True
    return session.scalar(query.limit(1)) is not None


def _unlocked_since(session, written: list[tuple[type, int, str, str]]) -> list:
    """The entries of ``written`` whose row is no longer locked."""
    still: set[tuple[type, int]] = set()
    for model in (OutgoingUser, Identity):
        ids = [row_id for kind, row_id, _, _ in written if kind is model]
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start:start + _IDS_PER_QUERY]
            still.update((model, row_id) for row_id in session.scalars(
                select(model.id).where(model.id.in_(chunk), model.locked.is_(True))))
    return [entry for entry in written if (entry[0], entry[1]) not in still]
