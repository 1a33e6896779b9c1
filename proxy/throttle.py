"""Failed SMTP AUTH throttling in Redis, per client (an IPv4 address, an IPv6 /64) and per
username.

One script per AUTH before any password is checked (``auth.lua``: the blocks of the client's
address and username, and whether the username succeeded from the client's network
recently), and the same script once more to record a success (remembering its network); a
password this process verified before needs only the second. Failures cost one transaction,
and one more write when they reach the limit. The check before the password also reserves a
slot for the attempt, counted toward the limit like a failure until the password is checked
(then released, or turned into the failure): scrypt takes a while, and without it any number
of parallel guesses would pass the check before the first failure was recorded. A username's
block does not apply to networks it logged in from recently, and failures from there count
only toward the address, so an attacker cannot lock the owner out of where they send from.
The policy (how many, for how long, which network) is ``scoring.locks``; the control panel
lists and clears blocks through ``outgoing.auth_blocks``. The clock is always passed in as ``now``.

While Redis is unreachable the same policy runs in the process's memory (``LocalThrottle``),
so an outage never opens the door to password guessing.
"""

from __future__ import annotations

import json
import math
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

from outgoing import redis_keys
from proxy.counters import LIMITS_LUA, LimitCheck, LimitsCall
from proxy.scripts import LuaScript
from scoring.locks import (
    AUTH_BLOCK_SECONDS,
    AUTH_FAILURE_LIMIT,
    AUTH_FAILURE_WINDOW_SECONDS,
    AUTH_KNOWN_NETWORK_DAYS,
    auth_block_until,
    auth_blocked,
    auth_client,
    auth_known_network,
    auth_known_network_since,
    auth_network,
)

KNOWN_NETWORKS_KEPT = 32  # per username: the most recently used ones
AUTH_LUA = Path(__file__).with_name("auth.lua").read_text(encoding="utf-8")
# On one Redis server, AUTH's script also counts the connection for the user when the
# password was right and nothing blocked it: ``limits.lua`` inside it, as a function of its
# own keys and arguments (the user's slot is not {auth}'s, so a Cluster needs two calls).
AUTH_AND_COUNT_LUA = f"""
local function throttle(KEYS, ARGV)
{AUTH_LUA}
end
local function limits(KEYS, ARGV)
{LIMITS_LUA}
end
local result = throttle({{unpack(KEYS, 1, 6)}}, {{unpack(ARGV, 1, 15)}})
if result[3] == 1 then
  local counted = limits({{unpack(KEYS, 7)}}, {{unpack(ARGV, 16)}})
  for i = 1, #counted do
    result[#result + 1] = counted[i]
  end
end
return result
"""
AUTH = LuaScript(AUTH_LUA)
AUTH_AND_COUNT = LuaScript(AUTH_AND_COUNT_LUA)

MAX_KNOWN_NETWORK_DAYS = 3650.0


def _days(value) -> float:
    """AUTH_KNOWN_NETWORK_DAYS as a number of days: off (0) unless positive; "for ever"
    (infinity, from an instance config.py) is ten years, which Redis can expire."""
    days = float(value or 0)
    if not days > 0:  # also NaN
        return 0.0
    return min(days, MAX_KNOWN_NETWORK_DAYS)


@dataclass(frozen=True)
class ThrottlePolicy:
    limit: int = AUTH_FAILURE_LIMIT
    window: float = AUTH_FAILURE_WINDOW_SECONDS
    block_seconds: float = AUTH_BLOCK_SECONDS
    known_network_days: float = AUTH_KNOWN_NETWORK_DAYS
    known_networks_kept: int = KNOWN_NETWORKS_KEPT

    @classmethod
    def from_config(cls, config: dict) -> ThrottlePolicy:
        return cls(limit=int(config.get("AUTH_FAILURE_LIMIT", AUTH_FAILURE_LIMIT) or 0),
                   window=float(config.get("AUTH_FAILURE_WINDOW_SECONDS",
                                           AUTH_FAILURE_WINDOW_SECONDS)),
                   block_seconds=float(config.get("AUTH_BLOCK_SECONDS", AUTH_BLOCK_SECONDS)),
                   known_network_days=_days(config.get("AUTH_KNOWN_NETWORK_DAYS",
                                                       AUTH_KNOWN_NETWORK_DAYS)))

    @property
    def known_network_seconds(self) -> int:
        return math.ceil(max(self.known_network_days, 0) * 86400)


@dataclass(frozen=True)
class AuthCheck:
    """What the proxy learns before checking a password, or as it records a success."""

    blocked: str | None  # the subject whose block refuses this AUTH, or None
    known_network: bool  # the login succeeded from the client's network recently
    succeeded: bool = False  # the success was recorded: asked, and unblocked (or ``checked``)
    # Either subject failed AUTH within the window (asked, and the success was recorded).
    failed_before: bool = False
    connection: LimitCheck | None = None  # the connection's count, when asked and succeeded


def _has_login(login: str | None) -> bool:
    return bool(login and login.strip())


def subjects(client_ip: str, login: str | None) -> list[str]:
    """The client (an IPv6 address as its /64, ``auth_client``) and the username."""
    found = [redis_keys.auth_subject_ip(auth_client(client_ip))]
    if _has_login(login):
        found.append(redis_keys.auth_subject_user(login))
    return found


def _first_blocked(names: list[str], untils: list[float | None], now: float) -> str | None:
    for name, until in zip(names, untils, strict=True):
        if auth_blocked(until, now):
            return name
    return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def check(redis, client_ip: str, login: str | None, now: float, policy: ThrottlePolicy,
                *, success: bool = False, checked: bool = False, ask_failures: bool = False,
                count: LimitsCall | None = None, reserve: str | None = None) -> AuthCheck:
    """Is this AUTH refused by a block at ``now``? From a network the login succeeded from
    recently, only the address's block applies. One script (``auth.lua``), one round trip.

    ``success``: the password is known to be right; when nothing is blocked, the same call
    remembers the client's network as one the login succeeded from (forgetting networks
    older than the policy's days, keeping the newest few) and, with ``ask_failures``, tells
    whether the address, or the login from the client's network (not from anywhere: anyone
    can fail with anyone's login), failed AUTH within the window (compromise detection's
    "failed AUTH followed by success"). So a login whose password this process has verified
    before costs one round trip, and any other two: the check before the password, this
    after it, with ``checked``: the success is then recorded (and the failures asked) even
    when a block came while scrypt ran, as the check before it let the login through.
    ``count`` (one Redis server only, with ``success``): the user's connection count
    (``counters.connection_call``), made in the same call when the success is.

    ``reserve``, a token unique to this attempt: when nothing refuses it, hold a slot for it
    (per address, and per username unless from a known network) until ``record_failure``
    turns it into a failure, or ``release`` (or this with ``checked``) gives it back. With
    ``reserve`` or a known password (``success`` without ``checked``), the failures within
    the window plus the slots held reaching the limit refuse the AUTH as a block does: at
    most the limit's worth of guesses are decided before a block, however many run at once."""
    names = subjects(client_ip, login)
    days = policy.known_network_days if policy.known_network_days > 0 else 0
    args = [repr(float(now)), names[0], names[1] if len(names) > 1 else "",
            auth_network(client_ip), repr(float(days * 86400)),
            ("2" if checked else "1") if success else "0",
            repr(float(auth_known_network_since(now, days=days))),
            max(policy.known_networks_kept, 1),
            (policy.known_network_seconds if days else 0) + 60, "1" if ask_failures else "0",
            max(policy.limit, 0) if not checked and (success or reserve) else 0,
            repr(float(now - policy.window)), reserve or "",
            repr(float(now - policy.window)), math.ceil(policy.window) + 1]
    keys = [redis_keys.AUTH_BLOCKS, redis_keys.auth_networks(login or ""),
            redis_keys.auth_failures(redis_keys.auth_subject_user(login or "")),
            redis_keys.auth_failures(names[0]), redis_keys.auth_pending(names[0]),
            redis_keys.auth_pending(redis_keys.auth_subject_user(login or ""))]
    if count is not None and success:
        raw = await AUTH_AND_COUNT(redis, keys + count.keys, args + count.args)
    else:
        raw = await AUTH(redis, keys, args)
    succeeded = int(raw[2]) == 1
    return AuthCheck(blocked=_text(raw[0]) or None, known_network=int(raw[1]) == 1,
                     succeeded=succeeded, failed_before=int(raw[3]) == 1,
                     connection=count.parse(raw[4:]) if count is not None and succeeded
                     else None)


async def blocked_subject(redis, client_ip: str, login: str | None, now: float,
                          policy: ThrottlePolicy | None = None) -> str | None:
    """The first of the address and the username that is blocked at ``now``, or None."""
    return (await check(redis, client_ip, login, now, policy or ThrottlePolicy())).blocked


def _pending_keys(client_ip: str, login: str | None) -> list[str]:
    return [redis_keys.auth_pending(name) for name in subjects(client_ip, login)]


async def release(redis, client_ip: str, login: str | None, token: str) -> None:
    """Give back the slot ``check`` reserved for an attempt that was not decided."""
    async with redis.pipeline(transaction=True) as pipe:
        for key in _pending_keys(client_ip, login):
            pipe.zrem(key, token)
        await pipe.execute()


async def record_failure(redis, client_ip: str, login: str | None, now: float,
                         policy: ThrottlePolicy, *, known_network: bool = False,
                         release: str | None = None) -> list[str]:
    """Count one failed AUTH for the address and the username; block those that reach the
    limit. From a network the login succeeded from recently (``known_network``, as
    ``check`` found) it counts for the address only: the owner's typos at home must not
    block them elsewhere. ``release``: the attempt's reserved slot, which this failure
    replaces in the same transaction (never both counted out at once). Returns the subjects
    blocked by this failure."""
    names = subjects(client_ip, None if known_network else login)
    # The network ends the member: a success from it is "failed AUTH followed by success"
    # (auth.lua), one from elsewhere is not.
    member = f"{now!r}:{secrets.token_hex(4)}|{auth_network(client_ip)}"
    keep = max(policy.limit, 1)
    async with redis.pipeline(transaction=True) as pipe:
        if release:
            for key in _pending_keys(client_ip, login):
                pipe.zrem(key, release)
        for name in names:
            key = redis_keys.auth_failures(name)
            pipe.zremrangebyscore(key, "-inf", now - policy.window)
            pipe.zadd(key, {member: now})
            pipe.zremrangebyrank(key, 0, -(keep + 1))
            pipe.zcard(key)
            pipe.expire(key, math.ceil(policy.window) + 1)
        results = await pipe.execute()
    results = results[len(_pending_keys(client_ip, login)):] if release else results
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
    """The policy in this process's memory, for when Redis cannot be reached. It learns the
    networks of every success this process sees, also while Redis is up, so the owner is
    not locked out during an outage either. Bounded: past ``max_subjects`` the oldest
    entries are forgotten."""

    def __init__(self, policy: ThrottlePolicy, max_subjects: int = 10000):
        self.policy = policy
        self.max_subjects = max_subjects
        self._failures: dict[str, deque[float]] = {}
        self._blocked: dict[str, float] = {}
        self._networks: dict[str, OrderedDict[str, float]] = {}  # username -> network -> when
        self._pending: dict[str, dict[str, float]] = {}  # subject -> reserved token -> when

    def _known(self, client_ip: str, login: str | None, now: float) -> bool:
        if not _has_login(login):
            return False
        seen = self._networks.get(redis_keys.auth_subject_user(login))
        last = seen.get(auth_network(client_ip)) if seen else None
        return auth_known_network(last, now, days=self.policy.known_network_days)

    def _used(self, name: str, now: float) -> int:
        """Failures within the window plus slots reserved for attempts being checked."""
        since = now - self.policy.window
        pending = self._pending.get(name)
        if pending:
            for token in [t for t, when in pending.items() if when <= since]:
                del pending[token]
        return sum(1 for t in self._failures.get(name, ()) if t > since) + len(pending or ())

    def check(self, client_ip: str, login: str | None, now: float, *,
              reserve: str | None = None, limited: bool = False) -> AuthCheck:
        """As ``check`` above: ``reserve`` holds a slot for the attempt; with it or
        ``limited``, failures plus slots held reaching the limit refuse as a block does."""
        known = self._known(client_ip, login, now)
        names = subjects(client_ip, None if known else login)
        blocked = _first_blocked(names, [self._blocked.get(n) for n in names], now)
        if blocked is None and (reserve is not None or limited) and self.policy.limit > 0:
            blocked = next((n for n in names if self._used(n, now) >= self.policy.limit),
                           None)
        if blocked is None and reserve is not None:
            for name in names:
                self._pending.setdefault(name, {})[reserve] = now
            while len(self._pending) > self.max_subjects:
                del self._pending[next(iter(self._pending))]
        return AuthCheck(blocked=blocked, known_network=known)

    def release(self, client_ip: str, login: str | None, token: str) -> None:
        for name in subjects(client_ip, login):
            pending = self._pending.get(name)
            if pending is not None:
                pending.pop(token, None)
                if not pending:
                    del self._pending[name]

    def blocked_subject(self, client_ip: str, login: str | None, now: float) -> str | None:
        return self.check(client_ip, login, now).blocked

    def record_success(self, client_ip: str, login: str | None, now: float) -> None:
        if not _has_login(login) or self.policy.known_network_days <= 0:
            return
        name = redis_keys.auth_subject_user(login)
        seen = self._networks.pop(name, None) or OrderedDict()
        network = auth_network(client_ip)
        seen.pop(network, None)
        seen[network] = now  # newest last
        while len(seen) > max(self.policy.known_networks_kept, 1):
            seen.popitem(last=False)
        self._networks[name] = seen  # re-inserted: the dict stays oldest-first
        while len(self._networks) > self.max_subjects:
            del self._networks[next(iter(self._networks))]

    def record_failure(self, client_ip: str, login: str | None, now: float,
                       known_network: bool | None = None,
                       release: str | None = None) -> list[str]:
        """As ``record_failure`` above; ``known_network`` None asks this process's memory."""
        if release is not None:
            self.release(client_ip, login, release)
        if known_network is None:
            known_network = self._known(client_ip, login, now)
        newly = []
        for name in subjects(client_ip, None if known_network else login):
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
