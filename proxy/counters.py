"""Redis counters for connection limits, recipients per day and spam events.

All keys of one outgoing user carry the hash tag ``{<user_id>}`` so they share a Redis Cluster
slot. The limit windows of a user live in one small hash checked and counted atomically by
``limits.lua`` in one round trip (EVALSHA, ``proxy.scripts``); the policy (windows,
estimate, replies) is ``scoring.limits``. The clock is always passed in as ``now``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis as AsyncRedis

from outgoing import redis_keys
from outgoing.redis_keys import user_limits as limits_key
from proxy.scripts import LuaScript
from scoring.limits import (
    ALLOWED,
    CONNECTION_WINDOWS,
    RECIPIENTS,
    WINDOW_SECONDS,
    LimitDecision,
    bucket_index,
    check_limit,
    counts_from_hash,
    ordered_windows,
    refused,
)

LIMITS_LUA = Path(__file__).with_name("limits.lua").read_text(encoding="utf-8")
LIMITS = LuaScript(LIMITS_LUA)
SPAM_WINDOW = 600  # seconds: "the 5th event in the window (10 minutes) locks"
SPAM_EVENTS_KEPT = 100  # newest events kept per key; bounds memory, far above any threshold

Counts = dict[str, tuple[int, int]]


def spam_key(user_id: int, identity: str | None = None) -> str:
    """The spam event window of a user, or of one identity behind that user."""
    if identity is None:
        return redis_keys.user_spam(user_id)
    return redis_keys.identity_spam(user_id, identity)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class LimitCheck:
    """What one run of ``limits.lua`` found and did."""

    decision: LimitDecision
    counts: Counts  # {window: (previous, current)} before this call
    counted: frozenset[str]  # windows counted by this call
    lock: str | None = None  # the lock's JSON when the user is locked (nothing counted)
    fields: Mapping[str, str] = field(default_factory=dict)  # window -> hash field counted


@dataclass(frozen=True)
class LimitsCall:
    """One call of ``limits.lua``, ready to send (alone, or inside a larger script)."""

    keys: list[str]
    args: list[str | int | float]
    windows: list[str]
    limits: dict[str, int | None]
    now: float

    def parse(self, raw) -> LimitCheck:
        """What the script said, from its reply (or the same list inside a larger reply)."""
        lock = _text(raw[2])
        if lock:
            return LimitCheck(ALLOWED, {}, frozenset(), lock=lock)
        windows = self.windows
        counts = {window: (int(raw[3 + 3 * i]), int(raw[4 + 3 * i]))
                  for i, window in enumerate(windows)}
        counted = frozenset(window for i, window in enumerate(windows)
                            if int(raw[5 + 3 * i]))
        fields = {window: f"{window}:{bucket_index(self.now, WINDOW_SECONDS[window])}"
                  for window in counted}
        if int(raw[0]) == 1:
            return LimitCheck(ALLOWED, counts, counted, fields=fields)
        window = _text(raw[1])
        limit = self.limits[window]
        if limit is None:  # the script only reports limited windows
            raise RuntimeError(f"limits script refused unlimited window {window!r}")
        return LimitCheck(refused(window, limit), counts, counted, fields=fields)


def limits_call(
    user_id: int,
    required: Mapping[str, int | None],
    now: float,
    *,
    optional: Mapping[str, int | None] | None = None,
    check_lock: bool = False,
    give_back: str | None = None,
) -> LimitsCall:
    """The keys and arguments of one ``limits.lua`` call: give back ``give_back`` (a hash
    field reserved earlier and unused), stop if the user is locked (``check_lock``), check
    every ``required`` window and count one event in each unless one is full, and count
    ``optional`` windows only where they fit. A limit of None is unlimited but still
    counted."""
    optional = optional or {}
    overlap = set(required) & set(optional)
    if overlap:
        raise ValueError(f"windows both required and optional: {sorted(overlap)}")
    windows = ordered_windows({**required, **optional})
    limits = {**required, **optional}
    args: list[str | int | float] = [repr(float(now)), give_back or ""]
    for window in windows:
        check_limit(window, limits[window])
        limit = limits[window]
        args += [window, WINDOW_SECONDS[window], "" if limit is None else limit,
                 1 if window in optional else 0]
    keys = [limits_key(user_id)]
    if check_lock:
        keys.append(redis_keys.user_lock(user_id))
    return LimitsCall(keys, args, windows, limits, now)


async def run_limits(redis: AsyncRedis, call: LimitsCall) -> LimitCheck:
    """One round trip of ``limits.lua``."""
    return call.parse(await LIMITS(redis, call.keys, call.args))


def connection_call(user_id: int, limits: Mapping[str, int | None], now: float) -> LimitsCall:
    """``count_connection``'s call of ``limits.lua``, for a script that runs it inside its own
    (AUTH's, ``throttle.check``)."""
    unknown = set(limits) - set(CONNECTION_WINDOWS)
    if unknown:
        raise ValueError(f"not connection windows: {sorted(unknown)}")
    return limits_call(user_id, {window: limits.get(window) for window in CONNECTION_WINDOWS},
                       now)


async def check_and_count(
    redis: AsyncRedis, user_id: int, limits: Mapping[str, int | None], now: float
) -> tuple[LimitDecision, Counts]:
    """Check every window in ``limits`` (None = unlimited but still counted) and count one
    event in each only when none is full. Also returns the counts found before this call,
    as ``{window: (previous, current)}``, for logging and for comparing with
    ``scoring.limits.decide``."""
    result = await run_limits(redis, limits_call(user_id, limits, now))
    return result.decision, result.counts


async def check_mail(
    redis: AsyncRedis,
    user_id: int,
    now: float,
    *,
    connection_limits: Mapping[str, int | None] | None,
    maximum_recipients_per_day: int | None,
    give_back: str | None = None,
) -> LimitCheck:
    """The MAIL stage in one round trip: the user's lock, the connection windows (pass None
    when this session was counted already; ``{}`` counts without limits) and one recipient
    reserved in advance when it fits, so a one-recipient message needs no second round trip.
    The reserved field is in ``fields[RECIPIENTS]``; give it back when no RCPT used it."""
    required: dict[str, int | None] = {}
    if connection_limits is not None:
        unknown = set(connection_limits) - set(CONNECTION_WINDOWS)
        if unknown:
            raise ValueError(f"not connection windows: {sorted(unknown)}")
        required = {window: connection_limits.get(window) for window in CONNECTION_WINDOWS}
    return await run_limits(redis, limits_call(
        user_id, required, now, optional={RECIPIENTS: maximum_recipients_per_day},
        check_lock=True, give_back=give_back))


async def give_back(redis: AsyncRedis, user_id: int, field_name: str, now: float) -> None:
    """Return one reserved event (e.g. a recipient reserved at MAIL that no RCPT used)."""
    await run_limits(redis, limits_call(user_id, {}, now, give_back=field_name))


async def count_connection(
    redis: AsyncRedis, user_id: int, limits: Mapping[str, int | None], now: float
) -> LimitDecision:
    """Count one SMTP session in every connection window unless one is full.

    ``limits`` maps "month", "week", "day", "hour", "minute" to a limit or None (missing =
    None; pass ``{}`` when limits are disabled so usage is still counted). A refused
    session is not counted."""
    return (await run_limits(redis, connection_call(user_id, limits, now))).decision


async def count_recipient(
    redis: AsyncRedis, user_id: int, max_per_day: int | None, now: float
) -> LimitDecision:
    """Count one accepted recipient over the rolling 24 hours unless the maximum is reached
    (None = unlimited, still counted). A refused recipient is not counted."""
    decision, _ = await check_and_count(redis, user_id, {RECIPIENTS: max_per_day}, now)
    return decision


async def check_rcpt(
    redis: AsyncRedis, user_id: int, max_per_day: int | None, now: float
) -> LimitCheck:
    """The RCPT stage in one round trip: the user's lock (set since MAIL checked it: the
    recipient is refused as MAIL would have been, nothing counted), then one recipient
    counted unless the maximum is reached, as ``count_recipient``."""
    return await run_limits(redis, limits_call(user_id, {RECIPIENTS: max_per_day}, now,
                                               check_lock=True))


async def record_spam_event(
    redis: AsyncRedis,
    key_base: str,
    now: float,
    window: float = SPAM_WINDOW,
    *,
    max_events: int = SPAM_EVENTS_KEPT,
) -> int:
    """Add one spam event at ``now`` to the sorted set ``key_base`` (see ``spam_key``) and
    return how many events fall in the last ``window`` seconds (capped at ``max_events``).
    One atomic round trip (MULTI/EXEC pipeline)."""
    member = f"{float(now)!r}:{secrets.token_hex(6)}"
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zremrangebyscore(key_base, "-inf", now - window)
        pipe.zadd(key_base, {member: now})
        pipe.zremrangebyrank(key_base, 0, -(max_events + 1))
        pipe.zcard(key_base)
        pipe.expire(key_base, math.ceil(window))
        results = await pipe.execute()
    return int(results[3])


async def read_usage(redis: AsyncRedis, user_id: int, now: float) -> Counts:
    """Counts of every window for ``scoring.limits.usage_report`` (read-only, one HGETALL)."""
    return counts_from_hash(await redis.hgetall(limits_key(user_id)), now)
