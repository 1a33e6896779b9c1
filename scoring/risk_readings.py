"""Compromise detection read back for people: each signal's value this hour against what the
sender's own baseline lets it send, its risk now and the rung that risk is on.

Pure: takes the numbers ``proxy/detection.lua`` keeps per subject (the identity, or ``*`` for
the user) and ``now``; the same formulas as ``scoring.risk.points``, so the panel says
"over" exactly when the next message would add that signal's points.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from scoring import risk


@dataclass(frozen=True)
class Reading:
    """One signal: this hour's value, the sender's 14-day hourly mean, and the value beyond
    which the signal adds points (``limit``)."""

    signal: str
    label: str
    value: float
    baseline: float | None
    limit: float
    unit: str
    # What the refused share makes of a bulk signal's points (risk.bulk_factor): 0 for an
    # established sender whose list the next hop takes cleanly; None for the others.
    weight: float | None = None

    @property
    def beyond(self) -> bool:
        return self.value > self.limit

    @property
    def over(self) -> bool:
        """Beyond the limit and weighted: the next message adds this signal's points."""
        return self.beyond and (self.weight is None or self.weight > 0)


@dataclass(frozen=True)
class Standing:
    """A subject's risk now and its rung (what the ladder would do at the next message)."""

    risk: float
    rung: str
    readings: tuple[Reading, ...]
    first_seen_hour: int | None
    known: bool  # the proxy has measured this sender at least once


def _num(fields: Mapping[str, float], name: str) -> float:
    return float(fields.get(name) or 0.0)


def standing(fields: Mapping[str, float], subject: str, now: float,
             settings: risk.Settings, *, refused: tuple[float, float] = (0.0, 0.0),
             answered: tuple[float, float] = (0.0, 0.0)) -> Standing:
    """``fields``: the state hash (``<subject>|<name>`` -> number); ``refused`` and
    ``answered``: recipients the next hop refused for good, and answered at all, this hour
    and the previous one (the answers hashes): the share is over a sliding hour, as the
    script has it."""
    s = subject.lower()

    def get(name: str) -> float:
        return _num(fields, f"{s}|{name}")

    hour = int(now // risk.HOUR)
    known = f"{s}|f" in fields
    first = int(get("f")) if known else hour
    value = risk.decay(get("r"), now - get("t"), settings.half_life)
    last = int(get("h"))
    means = {k: get(f"b{k}") for k in "mnd"}
    counts = {k: get(k) for k in "mnd"}
    if last and last < hour:  # the stored hour is over: fold it in, as the script will
        means = {k: risk.ema_fold(means[k], counts[k], hour - last) for k in "mnd"}
        counts = dict.fromkeys("mnd", 0.0)
    age_hours = hour - first
    age = now - first * risk.HOUR
    base = {k: risk.baseline(means[k], age_hours) for k in "mnd"}
    allowance = settings.new_sender_allowance
    share = risk.refused_share(risk.last_hour(*refused, now), risk.last_hour(*answered, now))
    weight = round(risk.bulk_factor(share, age), 3)
    readings = (
        Reading("volume", "Messages this hour", counts["m"], base["m"],
                risk.expected_per_hour(base["m"], age, allowance, risk.SLACK_MESSAGES),
                "messages", weight),
        Reading("recipients", "Recipients this hour", counts["n"], base["n"],
                risk.expected_per_hour(base["n"], age, allowance * 2,
                                       risk.SLACK_MESSAGES * 2), "recipients", weight),
        Reading("spread", "Recipient domains this hour", counts["d"], base["d"],
                risk.expected_per_hour(base["d"], age, allowance / 2, risk.SLACK_DOMAINS),
                "domains", weight),
        Reading("refusals", "Refused for good, last hour (estimated while few answered)",
                round(share, 3), None, risk.REFUSAL_FLOOR, "share"),
    )
    return Standing(risk=round(value, 2), rung=risk.rung_for(value, settings),
                    readings=readings, first_seen_hour=first if known else None, known=known)


def parse_state(raw: Mapping) -> dict[str, float]:
    """The state hash as Redis returns it (bytes or text) to numbers."""
    out: dict[str, float] = {}
    for key, value in raw.items():
        name = key.decode() if isinstance(key, bytes) else str(key)
        try:
            out[name] = float(value.decode() if isinstance(value, bytes) else value)
        except (TypeError, ValueError):
            continue
    return out
