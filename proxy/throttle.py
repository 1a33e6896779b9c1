"""Failed SMTP AUTH throttling in Redis, per client address and per username.

One read per AUTH (ZMSCORE on the blocks set) before any password is checked; failures cost
one transaction, and one more write when they reach the limit. The policy (how many, for how
long) is ``scoring.locks``; the control panel lists and clears blocks through
``outgoing.auth_blocks``. The clock is always passed in as ``now``.

While Redis is unreachable the same policy runs in the process's memory (``LocalThrottle``),
so an outage never opens the door to password guessing.
"""

from __future__ import annotations

import json
import math
import secrets
from collections import deque
from dataclasses import dataclass

from outgoing import redis_keys
from scoring.locks import (
    AUTH_BLOCK_SECONDS,
    AUTH_FAILURE_LIMIT,
    AUTH_FAILURE_WINDOW_SECONDS,
    auth_block_until,
    auth_blocked,
)


@dataclass(frozen=True)
class ThrottlePolicy:
    limit: int = AUTH_FAILURE_LIMIT
    window: float = AUTH_FAILURE_WINDOW_SECONDS
    block_seconds: float = AUTH_BLOCK_SECONDS

    @classmethod
    def from_config(cls, config: dict) -> ThrottlePolicy:
        return cls(limit=int(config.get("AUTH_FAILURE_LIMIT", AUTH_FAILURE_LIMIT) or 0),
                   window=float(config.get("AUTH_FAILURE_WINDOW_SECONDS",
                                           AUTH_FAILURE_WINDOW_SECONDS)),
                   block_seconds=float(config.get("AUTH_BLOCK_SECONDS", AUTH_BLOCK_SECONDS)))


def subjects(client_ip: str, login: str | None) -> list[str]:
    found = [redis_keys.auth_subject_ip(client_ip)]
    if login and login.strip():
        found.append(redis_keys.auth_subject_user(login))
    return found


async def blocked_subject(redis, client_ip: str, login: str | None, now: float) -> str | None:
    """The first of the address and the username that is blocked at ``now``, or None."""
    names = subjects(client_ip, login)
    scores = await redis.zmscore(redis_keys.AUTH_BLOCKS, names)
    for name, until in zip(names, scores, strict=True):
        if auth_blocked(None if until is None else float(until), now):
            return name
    return None


async def record_failure(redis, client_ip: str, login: str | None, now: float,
                         policy: ThrottlePolicy) -> list[str]:
    """Count one failed AUTH for the address and the username; block those that reach the
    limit. Returns the subjects blocked by this failure."""
    names = subjects(client_ip, login)
    member = f"{now!r}:{secrets.token_hex(4)}"
    keep = max(policy.limit, 1)
    async with redis.pipeline(transaction=True) as pipe:
        for name in names:
            key = redis_keys.auth_failures(name)
            pipe.zremrangebyscore(key, "-inf", now - policy.window)
            pipe.zadd(key, {member: now})
            pipe.zremrangebyrank(key, 0, -(keep + 1))
            pipe.zcard(key)
            pipe.expire(key, math.ceil(policy.window) + 1)
        results = await pipe.execute()
    counts = [int(results[5 * i + 3]) for i in range(len(names))]
    newly = []
    ends = {}
    for name, count in zip(names, counts, strict=True):
        until = auth_block_until(count, now, limit=policy.limit,
                                 block_seconds=policy.block_seconds)
        if until is not None:
            newly.append(name)
            ends[name] = (until, count)
    if newly:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(redis_keys.AUTH_BLOCKS, "-inf", now)  # forget ended blocks
            for name, (until, count) in ends.items():
                pipe.zadd(redis_keys.AUTH_BLOCKS, {name: until})
                pipe.set(redis_keys.auth_block_info(name),
                         json.dumps({"since": now, "until": until, "failures": count}),
                         ex=math.ceil(policy.block_seconds) + 60)
                pipe.delete(redis_keys.auth_failures(name))  # a fresh count after the block
            await pipe.execute()
    return newly


class LocalThrottle:
    """The policy in this process's memory, for when Redis cannot be reached. Bounded: past
    ``max_subjects`` the oldest entries are forgotten."""

    def __init__(self, policy: ThrottlePolicy, max_subjects: int = 10000):
        self.policy = policy
        self.max_subjects = max_subjects
        self._failures: dict[str, deque[float]] = {}
        self._blocked: dict[str, float] = {}

    def blocked_subject(self, client_ip: str, login: str | None, now: float) -> str | None:
        for name in subjects(client_ip, login):
            if auth_blocked(self._blocked.get(name), now):
                return name
        return None

    def record_failure(self, client_ip: str, login: str | None, now: float) -> list[str]:
        newly = []
        for name in subjects(client_ip, login):
            times = self._failures.pop(name, None) or deque(maxlen=max(self.policy.limit, 1))
            while times and times[0] <= now - self.policy.window:
                times.popleft()
            times.append(now)
            self._failures[name] = times  # re-inserted: the dict stays oldest-first
            until = auth_block_until(len(times), now, limit=self.policy.limit,
                                     block_seconds=self.policy.block_seconds)
            if until is not None:
                self._blocked.pop(name, None)
                self._blocked[name] = until
                del self._failures[name]
                newly.append(name)
        for table in (self._failures, self._blocked):
            while len(table) > self.max_subjects:
                del table[next(iter(table))]
        return newly
