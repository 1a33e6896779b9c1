"""Sliding-window rate limit policy: windows, the weighted estimate, the decision and its reply.

Each window keeps two counters, the current fixed bucket and the previous one. The number of
events in the last ``seconds`` is estimated as ``previous * (1 - elapsed / seconds) + current``
where ``elapsed`` is the time since the current bucket started: the previous bucket is assumed
evenly spread, so its share decays linearly while the current one fills. Two integers per
window give bounded memory and one atomic check in Redis (see ``proxy/limits.lua``, which
evaluates the same formula with the same operations in the same order).

Pure: callers pass the counts and ``now`` (float epoch seconds) and get frozen dataclasses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from scoring.replies import Reply

MINUTE = 60
HOUR = 3600
DAY = 86400
WEEK = 604800
MONTH = 2592000  # 30 days

# Connection windows, longest first: the order in which they are checked and reported
# (a longer window that is full stays full after a shorter one frees up, so it is the
# truer reason), and the order of the "Limit per ..." settings.
CONNECTION_WINDOWS: Mapping[str, int] = MappingProxyType(
    {"month": MONTH, "week": WEEK, "day": DAY, "hour": HOUR, "minute": MINUTE}
)
RECIPIENTS = "recipients"  # "Maximum number of recipients per day", a rolling 24 hours
WINDOW_SECONDS: Mapping[str, int] = MappingProxyType({**CONNECTION_WINDOWS, RECIPIENTS: DAY})

_CONNECTION_REPLY = (451, "4.7.1")
_RECIPIENT_REPLY = (452, "4.5.3")

Counts = Mapping[str, tuple[int, int]]
"""Per window name, ``(previous bucket count, current bucket count)``."""


@dataclass(frozen=True)
class LimitDecision:
    """Whether one more event fits; when not, which window is full and the reply to give."""

    allowed: bool
    window: str | None = None
    reply: Reply | None = None


ALLOWED = LimitDecision(allowed=True)


@dataclass(frozen=True)
class WindowUsage:
    """One row of the control panel's usage table.

    ``estimate`` is the sliding-window count now; ``remaining`` how many more events fit now
    (None when unlimited); ``resets_at``, if nothing more happens, when a full window takes one
    more event again, or else when the count reaches zero (None when it already is zero).
    It is never more than one window length away: every counted event happened before now,
    so by then it has left the real sliding window, even where the two-bucket estimate
    still lingers."""

    window: str
    seconds: int
    estimate: float
    limit: int | None
    remaining: int | None
    resets_at: float | None


def window_seconds(window: str) -> int:
    """Length of a named window; a clear error for a name that is not one."""
    try:
        return WINDOW_SECONDS[window]
    except KeyError:
        raise ValueError(f"unknown limit window {window!r}") from None


def bucket_index(now: float, seconds: int) -> int:
    """Index of the fixed bucket holding ``now`` (same arithmetic as the Lua script)."""
    return math.floor(now / seconds)


def bucket_start(now: float, seconds: int) -> int:
    """Epoch second at which the bucket holding ``now`` started."""
    return bucket_index(now, seconds) * seconds


def estimate(previous: int, current: int, now: float, seconds: int) -> float:
    """Sliding-window estimate of events in the last ``seconds`` before ``now``."""
    elapsed = now - bucket_index(now, seconds) * seconds
    return previous * (1 - elapsed / seconds) + current


def connection_limits(
    enabled: bool,
    *,
    limit_per_month: int | None = None,
    limit_per_week: int | None = None,
    limit_per_day: int | None = None,
    limit_per_hour: int | None = None,
    limit_per_minute: int | None = None,
) -> dict[str, int | None]:
    """Map the user's "Limit per ..." settings to window limits; all unlimited when the
    "Enable outgoing connection limits" switch is off."""
    if not enabled:
        return {window: None for window in CONNECTION_WINDOWS}
    return {
        "month": limit_per_month,
        "week": limit_per_week,
        "day": limit_per_day,
        "hour": limit_per_hour,
        "minute": limit_per_minute,
    }


def ordered_windows(windows: Mapping[str, object] | list[str]) -> list[str]:
    """The given window names in checking order (longest first, recipients last)."""
    names = list(windows)
    for name in names:
        window_seconds(name)
    return [name for name in WINDOW_SECONDS if name in names]


def limit_reply(window: str, limit: int, *, code: int | None = None) -> Reply:
    """The reply for a full window: 451 4.7.1 for connections, 452 4.5.3 for recipients.

    ``code`` overrides the basic code (e.g. 421 when refusing at connect time)."""
    if window == RECIPIENTS:
        basic, enhanced = _RECIPIENT_REPLY
        text = f"Maximum number of recipients per day ({limit}) reached, try again later"
    else:
        window_seconds(window)
        basic, enhanced = _CONNECTION_REPLY
        text = f"Outgoing connection limit per {window} ({limit}) reached, try again later"
    return Reply(code if code is not None else basic, f"{enhanced} {text}")


def refusal_at(decision: LimitDecision, code: int) -> Reply:
    """A full connection window answered when the connection opens (421) or at AUTH (454):
    the same words, with RFC 3463's 4.7.0 for "refused by policy"."""
    text = decision.reply.text if decision.reply else "4.7.0 Outgoing connection limit reached"
    return Reply(code, "4.7.0 " + text.split(" ", 1)[-1])


def refused(window: str, limit: int) -> LimitDecision:
    """The decision for a full window, with its reply."""
    return LimitDecision(allowed=False, window=window, reply=limit_reply(window, limit))


def check_limit(window: str, limit: int | None) -> None:
    """Reject a limit that is not a non-negative integer or None (a settings bug, not traffic)."""
    window_seconds(window)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit for {window!r} must be a non-negative integer or None")


def decide(limits: Mapping[str, int | None], counts: Counts, now: float) -> LimitDecision:
    """Would one more event exceed any limited window? Windows are checked longest first
    and the first full one is reported. A window without a limit (None) never refuses;
    a missing count is zero; a limit of 0 refuses everything."""
    for window in ordered_windows(limits):
        limit = limits[window]
        check_limit(window, limit)
        if limit is None:
            continue
        previous, current = counts.get(window, (0, 0))
        if estimate(previous, current, now, WINDOW_SECONDS[window]) + 1 > limit:
            return refused(window, limit)
    return ALLOWED


def usage_report(
    counts: Counts, now: float, limits: Mapping[str, int | None] | None = None
) -> tuple[WindowUsage, ...]:
    """Per window (month ... minute, then recipients) the estimate now, the limit, what is
    left and when the count clears, for the control panel."""
    limits = limits or {}
    rows = []
    for window, seconds in WINDOW_SECONDS.items():
        limit = limits.get(window)
        check_limit(window, limit)
        previous, current = counts.get(window, (0, 0))
        value = estimate(previous, current, now, seconds)
        remaining = None if limit is None else max(0, math.floor(limit - value))
        full = limit is not None and value + 1 > limit
        resets_at = _falls_to(limit - 1 if full else 0, previous, current, now, seconds)
        rows.append(WindowUsage(window, seconds, value, limit, remaining, resets_at))
    return tuple(rows)


def _falls_to(target: float, previous: int, current: int, now: float,
              seconds: int) -> float | None:
    """When the estimate, left alone, is down to ``target`` (None when it is already),
    capped at one window length from ``now``.

    Until the current bucket ends, the previous bucket's share decays to nothing and the
    current count stays; in the next bucket the current count is the previous one and
    decays to nothing by that bucket's end."""
    if estimate(previous, current, now, seconds) <= target:
        return None
    start = bucket_start(now, seconds)
    if current <= target:  # reached while the previous bucket's share decays
        when = start + seconds * (1 - (target - current) / previous)
    else:
        when = start + seconds + seconds * (1 - target / current)
    return min(when, now + seconds)


def counts_from_hash(fields: Mapping[bytes | str, bytes | str | int], now: float) -> Counts:
    """Pick every window's previous and current bucket out of a user's limits hash; the
    bucket after the current one (written by a proxy whose clock runs ahead) counts as
    current, as in ``proxy/limits.lua``."""
    values = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in fields.items()}
    counts = {}
    for window, seconds in WINDOW_SECONDS.items():
        bucket = bucket_index(now, seconds)
        counts[window] = (
            values.get(f"{window}:{bucket - 1}", 0),
            values.get(f"{window}:{bucket}", 0) + values.get(f"{window}:{bucket + 1}", 0),
        )
    return counts
