"""Newly registered sender domains ("Reject messages from newly registered domains").

Pure: the proxy looks the registration date up (RDAP, cached) and passes it here with the
clock. The registrable domain is the one a registrar sold (ICANN section of the Public Suffix
List, bundled with publicsuffixlist, no network): ``mail.shop.example.co.uk`` ->
``example.co.uk``, and ``alice.github.io`` -> ``github.io``, because RDAP answers for that
one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from publicsuffixlist import PublicSuffixList

from scoring.address import a_label_domain

# Built once: parsing the bundled list takes tens of milliseconds.
_PSL = PublicSuffixList(only_icann=True)

DAY = 86400.0


def registrable_domain(address_or_domain: str) -> str | None:
    """The registered domain of an address or host name, lower-case ASCII (IDNA); None for
    IP literals, bare public suffixes, single labels and anything unparseable."""
    if not isinstance(address_or_domain, str):
        return None
    if len(address_or_domain) <= _CACHED_LENGTH:  # an address: the same few, every message
        return _registrable_cached(address_or_domain)
    return _registrable(address_or_domain)


_CACHED_LENGTH = 320


def _registrable(address_or_domain: str) -> str | None:
    text = address_or_domain.strip().strip("<>").strip()
    if "@" in text:
        text = text.rsplit("@", 1)[1]
    text = text.strip().rstrip(".").lower()
    if not text or text.startswith("[") or len(text) > 253:
        return None
    if not text.isascii():
        try:
            text = a_label_domain(text)
        except UnicodeError:
            return None
    labels = text.split(".")
    if any(not label or len(label) > 63 for label in labels):
        return None
    if all(label.isdigit() for label in labels):
        return None  # a dotted IPv4 address, not a domain
    return _PSL.privatesuffix(text)


_registrable_cached = lru_cache(maxsize=4096)(_registrable)


def _span(seconds: float) -> str:
    """Human wording of max_age for the reply: 86400 -> 'a day', 7200 -> '2 hours'."""
    for unit, size in (("day", DAY), ("hour", 3600.0), ("minute", 60.0)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"a{'n' if unit == 'hour' else ''} {unit}" if count == 1 else (
                f"{count} {unit}s")
    return f"{seconds:g} seconds"


def newly_registered_verdict(
    domain: str, registered_at: float | None, now: float, *, max_age: float = DAY
) -> str | None:
    """The 550 reply when ``domain`` was registered less than ``max_age`` seconds before
    ``now``; None when it is older or the date is unknown (unknown never rejects).

    A registration date up to ``max_age`` in the future (clock skew) counts as new; one
    further ahead is bad data and is ignored rather than used to reject mail.
    """
    if registered_at is None:
        return None
    age = now - registered_at
    if age >= max_age or age < -max_age:
        return None
    shown = "".join(c if "!" <= c <= "~" else "?" for c in domain)[:253] or "(unknown)"
    return f"550 5.7.1 Sender domain {shown} was registered less than {_span(max_age)} ago"


def _parse_date(value: Any) -> float | None:
    """An RFC 3339 date (RDAP eventDate) as a POSIX timestamp; naive dates are UTC."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_rdap_registration(rdap_json: dict) -> float | None:
    """The latest "registration" event of an RDAP domain response (RFC 9083 section 4.5),
    as a POSIX timestamp; None when there is none or it cannot be read. The latest, because a
    domain that lapsed and was registered again is new again."""
    if not isinstance(rdap_json, dict):
        return None
    events = rdap_json.get("events")
    if not isinstance(events, list):
        return None
    dates = [
        _parse_date(event.get("eventDate"))
        for event in events
        if isinstance(event, dict)
        and isinstance(event.get("eventAction"), str)
        and event["eventAction"].strip().lower() == "registration"
    ]
    found = [date for date in dates if date is not None]
    return max(found) if found else None
