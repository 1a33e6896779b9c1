"""Timed unlocks: the job scheduled for each automatic lock, and the sweep that catches
whatever expired while no such job ran (worker down, Redis data lost)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select, update

from outgoing import audit, jobs, locks
from outgoing.changes import announce_config_change
from outgoing.locks import kind_of, owner_of
from outgoing.models import LOCK_AUTOMATIC, Identity, OutgoingUser, UsedToken
from scoring.locks import auto_unlock_decision

# RQ's scheduler works in whole seconds and may start a job up to a second early.
EARLY_TOLERANCE = timedelta(seconds=2)
DECLINED_NOTE_SECONDS = 7 * 86400


def expire(db, redis, target: OutgoingUser | Identity, lock_id: str, now: datetime) -> str:
    """Lift lock ``lock_id`` of ``target`` if its timeout has run out and unlocks remain.

    Safe to call twice, and from the scheduled job and the sweep at once: the row is
    claimed in the database (:func:`_claim`) and read afresh, and the lock must still be
    ``lock_id``, so only one caller counts the unlock. The caller may have loaded the row
    long before (the sweep loads every expired lock first), and an administrator who
    unlocked and locked it again meanwhile set a lock this must not lift.
    """
    _claim(db, target)
    db.refresh(target)
    owner = owner_of(target)
    current = bool(target.locked) and target.lock_id == lock_id
    if current and target.lock_kind != LOCK_AUTOMATIC:
        return "set by an administrator; only an administrator unlocks it"
    if current:
        if not owner.lock_timeout_minutes:
            return "no lock timeout; an administrator must unlock"
        due = target.locked_at + timedelta(minutes=owner.lock_timeout_minutes)
        if due > now + EARLY_TOLERANCE:
            # The timeout was raised after the lock: come back when it runs out.
            jobs.enqueue(redis, "worker.jobs.auto_unlock", kind_of(target), target.id,
                         lock_id, at=due)
            return f"not due before {due:%Y-%m-%d %H:%M:%S} UTC; rescheduled"
    decision = auto_unlock_decision(
        locked=bool(target.locked), current_lock_id=target.lock_id, job_lock_id=lock_id,
        unlocks_used=target.automatic_unlocks_used or 0,
        maximum_unlocks=owner.maximum_unlocks_by_timeout or 0)
    if decision.unlock:
        locks.unlock(db, redis, target, actor="worker",
                     reason=f"lock timeout expired ({decision.note})", automatic=True)
        announce_config_change(redis)
    elif current and redis.set(f"og:auto-unlock-declined:{lock_id}", 1, nx=True,
                               ex=DECLINED_NOTE_SECONDS):
        # Once per lock, so the sweep does not repeat it every few minutes.
        audit.record(db, actor="worker", action="auto_unlock_declined",
                     target_type=kind_of(target), target_id=target.id,
                     domain_id=owner.domain_id, reason=decision.note, lock_id=lock_id)
        db.commit()
    return decision.note


def _claim(db, target: OutgoingUser | Identity) -> None:
    """Claim the row for this transaction: a write that changes nothing, so PostgreSQL locks
    the row and SQLite the database until the commit (or the rollback), and a second caller
    waits, then reads the unlock done. The claim ends with the transaction: a worker killed
    mid-unlock loses its connection and with it the claim (a claim kept in Redis outlived
    the worker and kept the sender locked for days)."""
    model = type(target)
    same = {model.lock_id: model.lock_id}
    if hasattr(model, "updated_at"):
        same[model.updated_at] = model.updated_at  # a claim is no change to the row
    db.execute(update(model).where(model.id == target.id).values(same)
               .execution_options(synchronize_session=False))


def expired_locks(db, now: datetime) -> list[OutgoingUser | Identity]:
    """Automatic locks whose timeout has run out. Few rows are locked at any time, so the
    timeout (a setting of the owning user) is compared here rather than in SQL."""
    found = []
    for model in (OutgoingUser, Identity):
        query = select(model).where(model.locked.is_(True), model.lock_kind == LOCK_AUTOMATIC,
                                    model.locked_at.is_not(None))
        for target in db.scalars(query):
            minutes = owner_of(target).lock_timeout_minutes
            if minutes and target.locked_at + timedelta(minutes=minutes) <= now:
                found.append(target)
    return found


def sweep(db, redis, now: datetime, *, token_max_age: int) -> list[str]:
    """Unlock what expired; forget spent unlock-link ids that no link can present any more."""
    notes = []
    for target in expired_locks(db, now):
        note = expire(db, redis, target, target.lock_id, now)
        notes.append(f"{kind_of(target)} {target.id}: {note}")
    cutoff = now - timedelta(seconds=token_max_age) - timedelta(hours=1)
    db.execute(delete(UsedToken).where(UsedToken.used_at < cutoff))
    db.commit()
    return notes
