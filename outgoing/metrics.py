"""Counters that several processes add to and the panel's ``/metrics`` reports.

Locks and unlocks happen in the proxy, the panel and the worker; the worker's jobs run in
RQ's short-lived work horses, where no in-process registry survives the job. So these counts
live in one Redis hash (one HINCRBY each, best effort: a failure is logged, never raised),
and ``webapp/metrics.py`` turns them into ``outbound_guard_..._total`` counters.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

KEY = "og:metrics:counts"


def count(redis, name: str, amount: int = 1) -> None:
    try:
        redis.hincrby(KEY, name, amount)
    except Exception as exc:
        log.warning("could not count %s for the metrics: %s", name, exc)


def counts(redis) -> dict[str, int]:
    raw = redis.hgetall(KEY) or {}
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
