"""Sources of registration dates for "Reject messages from newly registered domains".

Two sources, either or both:

- **A daily list** of newly registered domains (the feeds sold or published per day), one
  domain a line, optionally followed by its registration date (``example.com`` or
  ``example.com,2026-11-28`` or ``example.com 2026-11-28T09:15:00Z``); ``#`` starts a comment.
  It is loaded into a Redis sorted set (domain -> registration time) by ``flask nrd import
  FILE`` or by the daily job reading ``NEWLY_REGISTERED_LIST``; entries older than
  :data:`LIST_KEEP_SECONDS` are dropped at each import.
- **RDAP** (``RDAP_URL``, e.g. a bootstrap redirector): ``GET {RDAP_URL}/domain/{name}``,
  looked up by the proxy at MAIL time with a timeout, the answer cached in Redis
  (:func:`rdap_cache_key`), unknown and failed look-ups cached for a shorter time.

With neither configured the control panel shows the setting as unavailable
(:func:`available`), as the product page says "(if available)".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from scoring.newdomains import registrable_domain

LIST_KEY = "og:nrd:list"
RDAP_PREFIX = "og:nrd:rdap:"
UNKNOWN = b"-"
# A list entry is kept for three days: "new" means under a day, the rest covers a late import.
LIST_KEEP_SECONDS = 3 * 86400
_BATCH = 5000


def available(config: dict, redis=None) -> bool:
    """Whether any source of registration dates exists: RDAP or a list file configured, or
    (when ``redis`` is given) a list imported by hand."""
    if (config.get("RDAP_URL") or "").strip() or (config.get("NEWLY_REGISTERED_LIST") or
                                                  "").strip():
        return True
    if redis is None:
        return False
    try:
        return bool(redis.exists(LIST_KEY))
    except Exception:  # Redis down: the page still renders, the setting shows unavailable
        return False


def rdap_cache_key(domain: str) -> str:
    return RDAP_PREFIX + domain


# Failed RDAP look-ups (timeouts, errors), counted per UTC day: they let mail through
# unchecked, so administrators must be able to see that the check is not working.
FAILED_LOOKUPS_PREFIX = "og:nrd:failed:"
FAILED_LOOKUPS_KEEP_SECONDS = 2 * 86400


def failed_lookups_key(now: float) -> str:
    return f"{FAILED_LOOKUPS_PREFIX}{int(now // 86400)}"


def failed_lookups_today(redis, now: float) -> int:
    """Look-ups that failed since midnight UTC, all users together (one cache serves all)."""
    return int(redis.get(failed_lookups_key(now)) or 0)


def _parse_when(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True)
class ImportResult:
    added: int
    skipped: int
    dropped: int


def parse_list(lines: Iterable[str | bytes], default_when: float):
    """Yield (registrable domain, registration time) per usable line; None for a bad line."""
    for raw in lines:
        line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, rest = line.replace(",", " ").replace("\t", " ").partition(" ")
        domain = registrable_domain(name)
        when = _parse_when(rest) if rest.strip() else default_when
        yield (domain, when) if domain and when is not None else None


def import_list(redis, lines: Iterable[str | bytes], *, registered_at: float,
                now: float) -> ImportResult:
    """Load a list into Redis; ``registered_at`` is used for lines without a date."""
    added = skipped = 0
    batch: dict[str, float] = {}
    for entry in parse_list(lines, registered_at):
        if entry is None:
            skipped += 1
            continue
        batch[entry[0]] = entry[1]
        if len(batch) >= _BATCH:
            redis.zadd(LIST_KEY, batch)
            added += len(batch)
            batch = {}
    if batch:
        redis.zadd(LIST_KEY, batch)
        added += len(batch)
    dropped = redis.zremrangebyscore(LIST_KEY, "-inf", f"({now - LIST_KEEP_SECONDS}")
    return ImportResult(added, skipped, int(dropped or 0))


def import_file(redis, path: str, *, registered_at: float, now: float) -> ImportResult:
    with open(path, "rb") as fh:
        return import_list(redis, fh, registered_at=registered_at, now=now)
