"""Current usage of an outgoing user's limit windows, for the control panel."""

from __future__ import annotations

from outgoing.models import OutgoingUser
from outgoing.redis_keys import user_limits
from scoring.limits import Counts, WindowUsage, counts_from_hash, usage_report


def read_usage_sync(redis, user_id: int, now: float) -> Counts:
    """Every window's (previous, current) bucket; feed it to ``scoring.limits.usage_report``."""
    return counts_from_hash(redis.hgetall(user_limits(user_id)), now)


def usage_rows(redis, user: OutgoingUser, now: float) -> list[tuple[WindowUsage, float | None]]:
    """Every limit window of ``user`` with its use now and the seconds until it resets (the
    settings page's "Current usage" and the Why? panel say the same)."""
    limits = {**user.limits, "recipients": user.maximum_recipients_per_day}
    return [(row, row.resets_at - now if row.resets_at else None)
            for row in usage_report(read_usage_sync(redis, user.id, now), now, limits)]
