"""Current usage of an outgoing user's limit windows, for the control panel."""

from __future__ import annotations

from outgoing.redis_keys import user_limits
from scoring.limits import Counts, counts_from_hash


def read_usage_sync(redis, user_id: int, now: float) -> Counts:
    """Every window's (previous, current) bucket; feed it to ``scoring.limits.usage_report``."""
    return counts_from_hash(redis.hgetall(user_limits(user_id)), now)
