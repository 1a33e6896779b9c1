"""Compromise detection on the hot path: one script per message on the user's keys.

``detection.lua`` measures the message (hourly volume and recipients against a 14-day moving
average, distinct recipient domains in a HyperLogLog, own copies of the content, the share of
recipients the next hop refused over the last hour),
adds the points ``scoring.risk`` defines, decays the risk and returns the rung before and
after, for the identity and for the user. The cross-customer count of the content (how many
identities anywhere send it this hour) lives under its own key, outside any user's slot: on
one Redis server the same script counts it (one call per message), on a Cluster a second
script does, concurrently; it weighs the next message's points, never adds points by itself.

The next hop's answers (recipients taken or refused for good) cost no round trip of their own:
``Answers`` keeps them in the process and they ride along with the user's next script call.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from outgoing import redis_keys
from outgoing.redis_conn import is_cluster
from proxy.scripts import LuaScript
from scoring import risk

CAMPAIGN_LUA = """
redis.call("PFADD", KEYS[1], ARGV[1])
redis.call("EXPIRE", KEYS[1], 7200)
return redis.call("PFCOUNT", KEYS[1])
"""
STATE_TTL = 15 * 86400  # an idle user's detection state goes after the baseline's span
RUNG_NAMES = {0: risk.OBSERVE, 1: risk.THROTTLE, 2: risk.HOLD, 3: risk.LOCK}
MAX_DOMAINS = 200  # recipient domains passed per message (the HyperLogLog needs no more)

def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_signals(text: str) -> dict[str, float]:
    parts = text.split()
    return {name: round(float(value), 3) for name, value in zip(parts[::2], parts[1::2],
                                                                  strict=False)}


@dataclass  # not frozen: a frozen dataclass's __init__ costs a microsecond more, per message
class Measure:
    """What the script found: risks, rungs before and after, and this message's points."""

    throttled: bool
    identity_risk: float
    user_risk: float
    identity_rung: tuple[str, str]  # (before, after)
    user_rung: tuple[str, str]
    identity_signals_text: str = ""  # "name points name points ..." as the script said
    user_signals_text: str = ""
    lock: str | None = None  # the identity's lock (JSON) when the script checked and found one
    # The user's lock (JSON), set after MAIL checked it, when the script checked the identity
    user_lock: str | None = None

    @cached_property
    def identity_signals(self) -> dict[str, float]:
        return _parse_signals(self.identity_signals_text)

    @cached_property
    def user_signals(self) -> dict[str, float]:
        """(Read only when a rung is at stake: most messages never need them parsed.)"""
        return _parse_signals(self.user_signals_text)

    @property
    def rung(self) -> str:
        return risk.higher(self.identity_rung[1], self.user_rung[1])

    @property
    def previous_rung(self) -> str:
        return risk.higher(self.identity_rung[0], self.user_rung[0])

    @property
    def signals(self) -> dict[str, float]:
        """The points behind the rung: the riskier subject's."""
        if self.user_risk > self.identity_risk and self.user_signals:
            return self.user_signals
        return self.identity_signals or self.user_signals


@dataclass(slots=True)  # not frozen, as Measure
class Evidence:
    """One message's facts, as the proxy saw them."""

    identity: str
    recipients: tuple[str, ...]
    fingerprint: str | None = None
    auth_failed: bool = False
    auth_new_network: bool = False
    spam: bool = False
    spam_score: float = 0.0
    spam_threshold: float = 5.0


def recipient_domains(recipients) -> list[str]:
    seen: dict[str, None] = {}
    for address in recipients:
        domain = address.rpartition("@")[2].strip().lower().rstrip(">")
        if domain:
            seen.setdefault(domain, None)
        if len(seen) >= MAX_DOMAINS:
            break
    return list(seen)


class CampaignCounts:
    """The last known cross-customer count per fingerprint (this process), bounded."""

    def __init__(self, size: int = 10000):
        self.size = size
        self._counts: OrderedDict[str, int] = OrderedDict()

    def get(self, fp: str) -> int:
        return self._counts.get(fp, 1)

    def put(self, fp: str, count: int) -> None:
        self._counts[fp] = count
        self._counts.move_to_end(fp)
        while len(self._counts) > self.size:
            self._counts.popitem(last=False)


class Answers:
    """The next hop's answers not yet told to Redis, per user (this process), bounded. They
    go with the user's next detection script: the refused share needs them only when the
    user sends again, and a round trip per relayed message would double detection's cost.
    With several proxy processes each brings its own, one message later."""

    MAX_AGE = risk.HOUR  # an answer older than the sliding hour no longer counts

    def __init__(self, size: int = 10000):
        self.size = size
        self._pending: OrderedDict[int, dict[str, list[float]]] = OrderedDict()

    def add(self, user_id: int, identity: str, answered: int, refused: int,
            now: float) -> None:
        """``answered`` recipients got a final answer, ``refused`` of them a refusal."""
        if answered <= 0 and refused <= 0:
            return
        per_user = self._pending.setdefault(user_id, {})
        self._pending.move_to_end(user_id)
        entry = per_user.setdefault(identity.lower(), [0, 0, now])
        entry[0] += answered
        entry[1] += refused
        entry[2] = min(entry[2], now)
        while len(self._pending) > self.size:
            self._pending.popitem(last=False)

    def take(self, user_id: int, now: float) -> list[tuple[str, int, int]]:
        per_user = self._pending.pop(user_id, None) or {}
        return [(identity, int(a), int(r)) for identity, (a, r, at) in per_user.items()
                if now - at < self.MAX_AGE]


def answered_by_next_hop(reply: str, recipients: int, refused_permanent: int,
                         refused_temporary: int) -> tuple[int, int]:
    """(recipients answered for good, refused for good) from a relay's outcome: a 2xx counts
    the recipients not deferred, a 5xx all of them as refused, a 4xx nothing yet."""
    if reply.startswith("2"):
        return max(recipients - refused_temporary, 0), refused_permanent
    if reply.startswith("5"):
        return recipients, recipients
    return 0, 0


def _constants() -> str:
    """scoring.risk's weights and constants, as detection.lua's table of them."""
    w = risk.WEIGHTS
    values = (
        w["volume"], w["recipients"], w["spread"], w["refusals"], w["campaign"],
        w["auth_failed"], w["auth_new_network"], w["content"], w["spam"],
        risk.PEAK_FACTOR, risk.SLACK_MESSAGES, risk.SLACK_DOMAINS, risk.REFUSAL_FLOOR,
        risk.REFUSAL_CLEAN, risk.CAMPAIGN_MIN_COPIES,
        risk.CAMPAIGN_BOOST_PER_DOUBLING, risk.CAMPAIGN_BOOST_CAP, risk.CONTENT_FLOOR,
        risk.BASELINE_HOURS, risk.RAMP_SECONDS, STATE_TTL,
        risk.REFUSAL_PRIOR, risk.REFUSAL_PRIOR_SHARE, risk.BULK_FACTOR_CAP)
    return ", ".join(map(repr, map(float, values)))


# The policy's constants are part of the script's source, not of every call's arguments:
# they change only with the code (a new source, a new SHA, loaded on first use).
DETECTION_LUA = (Path(__file__).with_name("detection.lua").read_text(encoding="utf-8")
                 .replace("--[[CONSTANTS]]", _constants()))
DETECT = LuaScript(DETECTION_LUA)
CAMPAIGN = LuaScript(CAMPAIGN_LUA)


def _numbers(evidence: Evidence, settings: risk.Settings, now: float, senders: int,
             enforce: bool) -> str:
    """The message's numbers as the script's one argument (see detection.lua)."""
    e, s = evidence, settings
    return (f"{int(now // risk.HOUR)} {len(e.recipients)} {bool(e.fingerprint):d} "
            f"{int(senders)} {bool(e.auth_failed):d} {bool(e.auth_new_network):d} "
            f"{bool(e.spam):d} {float(e.spam_score)!r} {float(e.spam_threshold)!r} "
            f"{float(s.new_sender_allowance)!r} {float(s.half_life)!r} "
            f"{float(s.throttle_at)!r} {float(s.hold_at)!r} {float(s.lock_at)!r} "
            f"{int(s.throttle_rate)} {bool(enforce):d}")


def _args(evidence: Evidence, settings: risk.Settings, now: float, senders: int,
          enforce: bool, answers: list[tuple[str, int, int]] = (),
          campaign_member: str = "", identity_field: str = "") -> list:
    return [repr(float(now)), evidence.identity.lower(),
            _numbers(evidence, settings, now, senders, enforce),
            campaign_member, identity_field, len(answers),
            *[v for answer in answers for v in answer],
            *recipient_domains(evidence.recipients)]


def keys_for(user_id: int, identity: str, now: float, fp: str | None) -> list[str]:
    hour = int(now // risk.HOUR)
    return [redis_keys.detection_state(user_id),
            redis_keys.detection_domains(user_id, identity, hour),
            redis_keys.detection_domains(user_id, "*", hour),
            redis_keys.detection_campaign(user_id, hour, fp or "-"),
            redis_keys.detection_refusals(user_id, hour),
            redis_keys.detection_refusals(user_id, hour - 1),
            redis_keys.identity_lock(user_id, identity),
            redis_keys.identity_counts(user_id),
            redis_keys.user_lock(user_id)]


async def measure(redis, user_id: int, evidence: Evidence, settings: risk.Settings,
                  now: float, campaigns: CampaignCounts | None = None,
                  answers: Answers | None = None, check_identity: bool = False) -> Measure:
    """Score one message in one call. Throttled (over the cap while throttled): nothing was
    counted. ``check_identity``: the script is also the identity check (``lock`` set when the
    identity is locked, ``user_lock`` when the user was locked after MAIL; nothing scored),
    so the message costs one call, not two. The
    content's count of senders anywhere is another slot's key: on one Redis the script counts
    it too; on a Cluster it is a second call, concurrent with the first."""
    hour = int(now // risk.HOUR)
    identity = evidence.identity.lower()
    fp = evidence.fingerprint
    campaigns = campaigns if campaigns is not None else CampaignCounts()
    senders = campaigns.get(fp) if fp else 1
    keys = keys_for(user_id, identity, now, fp)
    enforce = settings.enabled and not settings.shadow
    # Answers taken are not given back when the call fails: the script may have written them
    # before the failure (a reply timeout, a cancelled session, the other call of a Cluster
    # pair), and counting them twice would raise a sender's refused share; losing a few
    # under a Redis fault only lowers it.
    taken = answers.take(user_id, now) if answers is not None else []
    member = f"{user_id}:{identity}"
    count_field = redis_keys.identity_count_field("m", identity) if check_identity else ""
    if fp and is_cluster(redis):
        args = _args(evidence, settings, now, senders, enforce, taken, identity_field=count_field)
        count, raw = await asyncio.gather(
            CAMPAIGN(redis, [redis_keys.campaign_senders(hour, fp)], [member]),
            DETECT(redis, keys, args))
    else:
        if fp:
            keys.append(redis_keys.campaign_senders(hour, fp))
        args = _args(evidence, settings, now, senders, enforce, taken,
                     campaign_member=member if fp else "", identity_field=count_field)
        raw = await DETECT(redis, keys, args)
        count = raw[-1]
    if fp and count not in (None, b"", "") and raw[0] not in (b"locked", "locked"):
        campaigns.put(fp, int(count))
    return parse(raw)


def parse(raw) -> Measure:
    head = _text(raw[0])
    if head == "locked":
        lock = _text(raw[1])
        users = len(raw) > 2 and _text(raw[2]) == "user"
        return Measure(False, 0.0, 0.0, (risk.OBSERVE, risk.OBSERVE),
                       (risk.OBSERVE, risk.OBSERVE), lock=None if users else lock,
                       user_lock=lock if users else None)
    if head == "throttled":
        rung = RUNG_NAMES[int(raw[3])]
        return Measure(True, float(raw[1]), float(raw[2]), (rung, rung), (rung, rung))
    numbers, identity_signals, user_signals = head.split("|")
    _, identity_risk, user_risk, i0, i1, u0, u1 = numbers.split(" ")
    return Measure(
        throttled=False, identity_risk=float(identity_risk), user_risk=float(user_risk),
        identity_rung=(RUNG_NAMES[int(i0)], RUNG_NAMES[int(i1)]),
        user_rung=(RUNG_NAMES[int(u0)], RUNG_NAMES[int(u1)]),
        identity_signals_text=identity_signals, user_signals_text=user_signals)
