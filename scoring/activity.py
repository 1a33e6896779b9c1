"""Per-sender activity in time buckets, for the charts: what each log verdict counts as, the
buckets of a span, and the most one bucket may hold under the user's limits.

Pure: the caller passes grouped counts from the message log and ``now`` (epoch seconds).
Buckets are aligned to UTC hours and days, so a bar is "14:00-15:00 UTC", not "the 60
minutes before some moment".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from scoring.limits import CONNECTION_WINDOWS

# What a message-log verdict counts as. A "message" is a transaction from MAIL on, whatever
# became of it (refused at connect or AUTH is no message, abandoned is none either).
NOT_MESSAGES_STAGES = ("connect", "auth")
NOT_MESSAGES_VERDICTS = ("abandoned",)
SPAM_VERDICTS = ("quarantined",)  # the content check called it spam (rejected or accepted)
# Refusals count each refused recipient (``refused_count``: at RCPT by us, or by the next
# hop); a transaction with one of these verdicts and no refused recipient (refused at
# connect or MAIL, rejected for content or by the next hop at DATA, throttled) counts one.
REFUSED_VERDICTS = ("refused", "rejected", "throttled")

SERIES = ("messages", "recipients", "spam", "refusals")


@dataclass(frozen=True)
class Span:
    name: str  # "hour" or "day": the bucket
    seconds: int
    count: int

    @property
    def label(self) -> str:
        return f"per {self.name}, last {self.count} {self.name}s"


HOURLY = Span("hour", 3600, 48)
DAILY = Span("day", 86400, 30)
SPANS = {span.name: span for span in (HOURLY, DAILY)}


@dataclass(frozen=True)
class Bucket:
    start: int  # epoch seconds, UTC-aligned
    messages: int = 0
    recipients: int = 0
    spam: int = 0
    refusals: int = 0

    def value(self, series: str) -> int:
        return getattr(self, series)


def first_bucket(now: float, span: Span) -> int:
    """Index of the oldest bucket shown (the newest holds ``now``)."""
    return math.floor(now / span.seconds) - span.count + 1


def bounds(now: float, span: Span) -> tuple[int, int]:
    """[start, end) in epoch seconds of the whole span."""
    first = first_bucket(now, span)
    return first * span.seconds, (first + span.count) * span.seconds


def fill(rows: Iterable[tuple], now: float, span: Span) -> list[Bucket]:
    """Every bucket of the span, oldest first, from ``(bucket index, messages, recipients,
    spam, refusals)`` rows (missing buckets are zero; rows outside the span are ignored)."""
    first = first_bucket(now, span)
    found: dict[int, tuple] = {}
    for index, *values in rows:
        index = int(index)
        if first <= index < first + span.count:
            found[index] = tuple(int(v or 0) for v in values)
    return [Bucket((first + n) * span.seconds, *found.get(first + n, (0, 0, 0, 0)))
            for n in range(span.count)]


@dataclass(frozen=True)
class Ceiling:
    """The most one bucket may hold under a limit, and which setting says so."""

    value: int
    window: str  # the limit window it comes from ("hour", "minute", ..., "recipients")
    limit: int  # the setting's value
    bucket: str  # the span's bucket ("hour" or "day")

    @property
    def label(self) -> str:
        name = "Recipients per day" if self.window == "recipients" else \
            f"Limit per {self.window}"
        if self.value == self.limit:
            return f"{name}: {self.limit:,}"
        return f"{name}: {self.limit:,} (= {self.value:,} per {self.bucket})"


def message_ceiling(limits: Mapping[str, int | None], span: Span) -> Ceiling | None:
    """The tightest connection limit scaled to one bucket: a window shorter than the bucket
    fits ``bucket / window`` times (60 per minute is 3,600 per hour), a longer one at most
    once (a day's limit may all be sent in one hour). None without limits."""
    best: Ceiling | None = None
    for window, seconds in CONNECTION_WINDOWS.items():
        limit = limits.get(window)
        if limit is None:
            continue
        value = limit * (span.seconds // seconds) if seconds < span.seconds else limit
        if best is None or value < best.value:
            best = Ceiling(value, window, limit, span.name)
    return best


def recipient_ceiling(maximum_per_day: int | None, span: Span) -> Ceiling | None:
    """The rolling 24-hour recipient maximum: an hour or a calendar day may hold it all."""
    if maximum_per_day is None:
        return None
    return Ceiling(maximum_per_day, "recipients", maximum_per_day, span.name)


def totals(buckets: Iterable[Bucket]) -> dict[str, int]:
    out = dict.fromkeys(SERIES, 0)
    for bucket in buckets:
        for name in SERIES:
            out[name] += bucket.value(name)
    return out
