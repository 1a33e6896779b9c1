"""When spam locks a sender, and whether a timed unlock may undo a lock."""

from __future__ import annotations

from dataclasses import dataclass

SPAM_THRESHOLD = 5
SPAM_WINDOW_SECONDS = 600


def should_lock(spam_in_window: int, *, enabled: bool, threshold: int = SPAM_THRESHOLD) -> bool:
    """The threshold-th spam inside the window locks, when automatic locking is on."""
    return enabled and spam_in_window >= threshold


def lock_reason(spam_in_window: int, window_seconds: int = SPAM_WINDOW_SECONDS) -> str:
    minutes = max(1, window_seconds // 60)
    return f"{spam_in_window} spam messages in {minutes} minutes"


@dataclass(frozen=True)
class AutoUnlock:
    unlock: bool
    note: str


def auto_unlock_decision(*, locked: bool, current_lock_id: str | None, job_lock_id: str,
                         unlocks_used: int, maximum_unlocks: int) -> AutoUnlock:
    """A timed unlock undoes only the lock it was scheduled for, and only while allowed."""
    if not locked or current_lock_id != job_lock_id:
        return AutoUnlock(False, "lock already lifted or replaced; nothing to do")
    if unlocks_used >= maximum_unlocks:
        return AutoUnlock(False, f"all {maximum_unlocks} automatic unlocks used; "
                                 "an administrator must unlock")
    return AutoUnlock(True, f"automatic unlock {unlocks_used + 1} of {maximum_unlocks}")
