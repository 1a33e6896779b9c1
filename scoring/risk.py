"""Compromise detection: behaviour signals -> risk points, risk decay, and the response ladder.

Pure policy (DESIGN.md "Compromise detection"): the proxy's Redis script measures, this module
decides. The same functions score an identity against its own history and an outgoing user
against its own, so a busy customer is compared with itself and never with its neighbours.

Risk is a sum of points that halves every ``half_life`` seconds. Each message adds the points
of what it shows; a one-off oddity fades, a pattern climbs the ladder:
observe -> throttle -> hold -> lock.

Bulk sending (volume, recipients, spread, own copies of one content) is what a compromised
sender and a newsletter day or a shop's sale have in common; what tells them apart is how the
recipients' servers answer. So the bulk points are weighed by the refusals (``bulk_factor``):
a harvested list (many permanent refusals) multiplies them, a clean list cancels them for a
sender with an established history (7 days), and a new sender keeps them whole. Before the next
hop has answered, a prior counts as half-proven.

The cross-customer rule: campaign points come only from the sender's own sending of that
content beyond its own baseline. How many other senders use the same content only multiplies
those points (``campaign_boost``, at most ``CAMPAIGN_BOOST_CAP`` times), so copying a rival's
newsletter gives the rival no points while it sends within its own habits; once it sends
beyond them, the copies can make those points weigh up to that much more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

OBSERVE, THROTTLE, HOLD, LOCK = "observe", "throttle", "hold", "lock"
RUNGS = (OBSERVE, THROTTLE, HOLD, LOCK)

HOUR = 3600
BASELINE_HOURS = 14 * 24  # the moving average spans 14 days of hourly buckets
RAMP_SECONDS = 7 * 86400  # identities younger than this ramp up from the allowance

# Points per message, per signal. Tuned on bench/bench_detection.py's first traffic set
# (README "Compromise detection" has the table and the figures).
WEIGHTS = {
    "volume": 4.0,         # per message, times the excess over the expected hourly rate (cap 3)
    "recipients": 2.0,     # likewise for recipients
    "spread": 4.0,         # distinct recipient domains beyond the expected spread (cap 3)
    "refusals": 30.0,      # times the permanently refused share beyond 10 %
    "campaign": 5.0,       # per own copy of one content beyond the own baseline
    "auth_failed": 15.0,   # failed AUTH then success (once per session)
    "auth_new_network": 8.0,  # AUTH from a /24 or /48 new for the user (once per session)
    "content": 6.0,        # times the spam score as a share of the spam threshold
    "spam": 15.0,          # a spam verdict (below the lock count)
}
PEAK_FACTOR = 4.0  # an hour may run this many times the 14-day mean (diurnal peaks)
SLACK_MESSAGES = 6.0  # and always this many messages more, so small senders are not noise
SLACK_DOMAINS = 4.0
REFUSAL_FLOOR = 0.10  # refused shares up to 10 % are normal (typos, full mailboxes)
REFUSAL_CLEAN = 0.05  # at most this share refused: a clean list (bulk points fade by trust)
REFUSAL_PRIOR = 20.0  # the share is estimated as if this many recipients had been answered
REFUSAL_PRIOR_SHARE = 0.075  # ... with this share refused: unproven, between clean and floor
BULK_FACTOR_CAP = 3.0  # a harvested list multiplies the bulk points at most this much
CAMPAIGN_MIN_COPIES = 3  # own copies of one content per hour that are always fine
CAMPAIGN_BOOST_PER_DOUBLING = 0.5  # x1.5 at 2 senders, x2 at 4, ... (cap x4)
CAMPAIGN_BOOST_CAP = 4.0
CONTENT_FLOOR = 0.3  # scores under 30 % of the spam threshold are ordinary mail


@dataclass(frozen=True)
class Signals:
    """What the proxy measured for one sender (identity or user) at one message."""

    messages_hour: float = 0  # this hour so far, this message included
    recipients_hour: float = 0
    domains_hour: float = 0  # distinct recipient domains (HyperLogLog estimate)
    baseline_messages: float = 0  # mean messages per hour over 14 days (bias-corrected)
    baseline_recipients: float = 0
    baseline_domains: float = 0
    age_seconds: float = 0  # since first seen
    refused_hour: float = 0  # recipients the next hop refused permanently, last hour
    answered_hour: float = 0  # recipients it answered (took or refused for good), last hour
    campaign_own: float = 0  # own copies of this message's content this hour (this one too)
    campaign_senders: float = 1  # distinct identities anywhere sending it this hour
    auth_failed: bool = False  # failed AUTH then success in this session (first message)
    auth_new_network: bool = False
    spam_score: float = 0.0
    spam_threshold: float = 5.0
    spam: bool = False


@dataclass(frozen=True)
class Settings:
    """A user's "Compromise detection" section."""

    enabled: bool = True
    shadow: bool = True
    throttle_at: float = 60.0
    hold_at: float = 120.0
    lock_at: float = 400.0
    throttle_rate: int = 10  # messages per minute while throttled
    new_sender_allowance: float = 20.0  # messages per hour a brand-new identity may send
    release_pace: int = 30  # held messages per minute when released
    half_life: float = 3600.0


def decay(risk: float, elapsed: float, half_life: float) -> float:
    """``risk`` after ``elapsed`` seconds of halving every ``half_life`` seconds."""
    if risk <= 0 or elapsed <= 0:
        return max(risk, 0.0)
    if half_life <= 0:
        return 0.0
    return risk * math.pow(0.5, elapsed / half_life)


def expected_per_hour(baseline: float, age_seconds: float, allowance: float,
                      slack: float) -> float:
    """The most a sender is expected to send in one hour: its peak hour by the 14-day mean,
    blended with the new sender allowance while it is younger than 7 days."""
    own = baseline * PEAK_FACTOR + slack
    if age_seconds >= RAMP_SECONDS:
        return own
    share = max(age_seconds, 0.0) / RAMP_SECONDS
    return share * own + (1 - share) * max(allowance, own)


def _excess(observed: float, expected: float) -> float:
    """How far past the expected rate, in multiples of it (0 when within; cap 3)."""
    if expected <= 0 or observed <= expected:
        return 0.0
    return min(observed / expected - 1.0, 3.0)


def campaign_boost(senders: float) -> float:
    """The weight other senders of the same content add to one's own excess copies."""
    doublings = math.log2(max(senders, 1.0))
    return min(1.0 + CAMPAIGN_BOOST_PER_DOUBLING * doublings, CAMPAIGN_BOOST_CAP)


def last_hour(current: float, previous: float, now: float) -> float:
    """A sliding hour from two hourly buckets: this hour's count and the part of the previous
    hour's that still lies within the last 60 minutes (assumed even)."""
    elapsed = (now % HOUR) / HOUR
    return current + previous * (1.0 - elapsed)


def refused_share(refused: float, answered: float) -> float:
    """The share of recipients the next hop refused for good, pulled towards an unproven
    prior while few have been answered (two refusals of three recipients prove nothing)."""
    return ((refused + REFUSAL_PRIOR * REFUSAL_PRIOR_SHARE)
            / (max(answered, 0.0) + REFUSAL_PRIOR))


def bulk_factor(share: float, age_seconds: float) -> float:
    """What the refused share makes of the bulk points: 0 for a clean list, 1 at the floor of
    normal refusals, up to BULK_FACTOR_CAP for a harvested one. Below 1 only as far as the
    sender has a history (age up to 7 days): a new sender's bulk is never excused."""
    by_share = min(max((share - REFUSAL_CLEAN) / (REFUSAL_FLOOR - REFUSAL_CLEAN), 0.0),
                   BULK_FACTOR_CAP)
    if by_share >= 1.0:
        return by_share
    trust = min(max(age_seconds, 0.0) / RAMP_SECONDS, 1.0)
    return 1.0 - trust * (1.0 - by_share)


def points(s: Signals, settings: Settings, weights: dict[str, float] | None = None,
           ) -> dict[str, float]:
    """The points one message adds, per signal (only the signals that fired)."""
    w = weights or WEIGHTS
    allowance = settings.new_sender_allowance
    bulk: dict[str, float] = {}
    expected_messages = expected_per_hour(s.baseline_messages, s.age_seconds, allowance,
                                          SLACK_MESSAGES)
    value = _excess(s.messages_hour, expected_messages)
    if value:
        bulk["volume"] = w["volume"] * value
    expected_rcpts = expected_per_hour(s.baseline_recipients, s.age_seconds, allowance * 2,
                                       SLACK_MESSAGES * 2)
    value = _excess(s.recipients_hour, expected_rcpts)
    if value:
        bulk["recipients"] = w["recipients"] * value
    expected_domains = expected_per_hour(s.baseline_domains, s.age_seconds, allowance / 2,
                                         SLACK_DOMAINS)
    value = _excess(s.domains_hour, expected_domains)
    if value:
        bulk["spread"] = w["spread"] * value
    if s.campaign_own > CAMPAIGN_MIN_COPIES + s.baseline_messages:
        # Only one's own copies beyond one's own expectation count; others only weigh them.
        bulk["campaign"] = w["campaign"] * campaign_boost(s.campaign_senders)
    share = refused_share(s.refused_hour, s.answered_hour)
    factor = bulk_factor(share, s.age_seconds)
    out = {name: value * factor for name, value in bulk.items() if value * factor > 0}
    if share > REFUSAL_FLOOR:
        out["refusals"] = w["refusals"] * (share - REFUSAL_FLOOR)
    if s.auth_failed:
        out["auth_failed"] = w["auth_failed"]
    if s.auth_new_network:
        out["auth_new_network"] = w["auth_new_network"]
    if s.spam:
        out["spam"] = w["spam"]
    elif s.spam_threshold > 0:
        share = s.spam_score / s.spam_threshold
        if share > CONTENT_FLOOR:
            out["content"] = w["content"] * min(share, 1.0)
    return {name: round(value, 3) for name, value in out.items()}


def rung_for(risk: float, settings: Settings) -> str:
    """The highest rung whose threshold ``risk`` has reached (a threshold of 0 is off)."""
    for rung, at in ((LOCK, settings.lock_at), (HOLD, settings.hold_at),
                     (THROTTLE, settings.throttle_at)):
        if at and at > 0 and risk >= at:
            return rung
    return OBSERVE


def higher(a: str, b: str) -> str:
    return a if RUNGS.index(a) >= RUNGS.index(b) else b


@dataclass(frozen=True)
class Decision:
    """What the ladder says for one message. ``effective`` is what happens to the mail;
    ``rung`` is what the risk alone calls for (they differ in shadow mode)."""

    rung: str
    effective: str
    shadow: bool
    identity_risk: float
    user_risk: float
    signals: dict[str, float] = field(default_factory=dict)

    @property
    def would_have(self) -> bool:
        return self.shadow and self.rung != OBSERVE


def decide(identity_risk: float, user_risk: float, settings: Settings,
           signals: dict[str, float] | None = None) -> Decision:
    """The rung of the riskier of identity and user; nothing happens while off or shadowed."""
    rung = higher(rung_for(identity_risk, settings), rung_for(user_risk, settings))
    if not settings.enabled:
        rung = OBSERVE
    effective = OBSERVE if settings.shadow else rung
    return Decision(rung=rung, effective=effective, shadow=settings.shadow,
                    identity_risk=round(identity_risk, 2), user_risk=round(user_risk, 2),
                    signals=dict(signals or {}))


def describe(signals: dict[str, float]) -> str:
    """The signals behind a rung, biggest first, for lock reasons and audit events."""
    top = sorted(signals.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {value:g}" for name, value in top) or "accumulated risk"


def lock_reason(decision: Decision) -> str:
    return (f"Compromise detection: risk {decision.identity_risk:g} (user "
            f"{decision.user_risk:g}) from {describe(decision.signals)}")[:500]


def throttled(sent_this_minute: int, rate: int) -> bool:
    """Over the throttle rate: this message waits (451 4.7.1)."""
    return rate > 0 and sent_this_minute > rate


def ema_fold(mean: float, count: float, gap_hours: int,
             span: int = BASELINE_HOURS) -> float:
    """Fold one finished hour of ``count``, and the ``gap_hours - 1`` empty hours after it,
    into an exponential moving average over ``span`` hours (the 14-day baseline in O(1)
    state: one number per sender instead of 336 buckets)."""
    alpha = 1.0 / span
    gap = max(int(gap_hours), 1)
    return mean * (1 - alpha) ** gap + alpha * count * (1 - alpha) ** (gap - 1)


def baseline(mean: float, age_hours: float, span: int = BASELINE_HOURS) -> float:
    """The mean per hour, corrected for a sender younger than the span (its average is its
    own, not diluted by the hours before it existed)."""
    if age_hours <= 0:
        return 0.0
    weight = 1 - (1 - 1.0 / span) ** age_hours
    return mean / weight if weight > 0 else 0.0
