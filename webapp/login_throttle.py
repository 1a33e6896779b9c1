"""Password guessing on the panel's login form is throttled like SMTP AUTH.

``AUTH_FAILURE_LIMIT`` failed logins within ``AUTH_FAILURE_WINDOW_SECONDS`` block the client
address for ``AUTH_BLOCK_SECONDS``, and block the admin's email the same way, except from
networks (/24, /64) the admin logged in from within ``AUTH_KNOWN_NETWORK_DAYS``: guessing
from elsewhere cannot lock the owner out. While blocked, no password is checked, not even
the right one. With Redis unreachable the form still works, unthrottled (logged).

Each attempt is charged as a failure before its password is checked (``begin``), and given
back when the password was right (``record_success``): a password check takes a while, and
without the charge any number of parallel guesses would pass the check before the first
failure was counted. An attempt charged past the limit blocks at once, unchecked.

The client is the connection's address; for a connection from loopback (a reverse proxy on
the same machine, as README's "Going live" has it) the address that proxy appended last to
``X-Forwarded-For``, so one guesser behind the proxy does not block every admin's login. A
header from anyone else is ignored: a remote client cannot pick its own address.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field

from flask import current_app, request

from outgoing import redis_keys
from scoring.locks import auth_client, auth_network

IP, EMAIL = "ip", "email"


def client_address() -> str:
    remote = request.remote_addr or "unknown"
    try:
        from_loopback = ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return remote
    if from_loopback:
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
        try:
            return str(ipaddress.ip_address(forwarded))
        except ValueError:
            pass
    return remote


def _settings() -> tuple[int, int, int, int]:
    config = current_app.config
    return (int(config["AUTH_FAILURE_LIMIT"]),
            max(1, math.ceil(float(config["AUTH_FAILURE_WINDOW_SECONDS"]))),
            max(1, math.ceil(float(config["AUTH_BLOCK_SECONDS"]))),
            max(0, math.ceil(float(config.get("AUTH_KNOWN_NETWORK_DAYS") or 0) * 86400)))


def _subjects(redis, client_ip: str, email: str, known_seconds: int) -> list[tuple[str, str]]:
    """Who an attempt counts against: the client (an IPv6 address as its /64, which one
    host can fill with addresses of its own), and the email unless the admin logged in from
    the client's network within ``AUTH_KNOWN_NETWORK_DAYS``."""
    subjects = [(IP, auth_client(client_ip))]
    if not (known_seconds and redis.exists(
            redis_keys.panel_login_known(email, auth_network(client_ip)))):
        subjects.append((EMAIL, email))
    return subjects


def blocked_for(redis, client_ip: str, email: str) -> int:
    """Seconds this login attempt must wait (0: go ahead)."""
    limit, _window, _block, known_seconds = _settings()
    if limit <= 0:
        return 0
    return max([0] + [redis.ttl(redis_keys.panel_login_block(kind, value))
                      for kind, value in _subjects(redis, client_ip, email, known_seconds)])


@dataclass
class Attempt:
    """A login attempt let through to its password check, charged as a failure."""

    charged: list[tuple[str, str, int]] = field(default_factory=list)  # kind, value, count


# Charges every subject of one attempt, atomically with the check of their blocks: a block
# set (and its count dropped) by a parallel attempt refuses this one here, where a charge
# after the drop would have started a fresh count and let the guess through. KEYS come in
# pairs (failures, block); a count starts its window with its first charge. Returns
# {0, seconds to wait} when a subject is blocked, else {1, count, count, ...}.
_CHARGE = """
local wait = 0
for i = 2, #KEYS, 2 do
  local ttl = redis.call('ttl', KEYS[i])
  if ttl > wait then wait = ttl elseif ttl == -1 then wait = tonumber(ARGV[2]) end
end
if wait > 0 then return {0, wait} end
local counts = {1}
for i = 1, #KEYS, 2 do
  local count = redis.call('incr', KEYS[i])
  if count == 1 then redis.call('expire', KEYS[i], ARGV[1]) end
  counts[#counts + 1] = count
end
return counts
"""


def begin(redis, client_ip: str, email: str) -> int | Attempt:
    """Seconds to wait (the attempt is refused unchecked), or the charged ``Attempt``."""
    wait = blocked_for(redis, client_ip, email)
    if wait:
        return wait
    limit, window, block, known_seconds = _settings()
    attempt = Attempt()
    if limit <= 0:
        return attempt
    subjects = _subjects(redis, client_ip, email, known_seconds)
    keys = [key for kind, value in subjects
            for key in (redis_keys.panel_login_failures(kind, value),
                        redis_keys.panel_login_block(kind, value))]
    answer = redis.register_script(_CHARGE)(keys=keys, args=[window, block])
    if int(answer[0]) == 0:
        return int(answer[1])
    attempt.charged = [(kind, value, int(count))
                       for (kind, value), count in zip(subjects, answer[1:], strict=True)]
    over = [(kind, value) for kind, value, count in attempt.charged if count > limit]
    if over:
        _block(redis, over, block)
        return block
    return attempt


def _block(redis, subjects: list[tuple[str, str]], block: int) -> None:
    for kind, value in subjects:
        redis.set(redis_keys.panel_login_block(kind, value), 1, ex=block)
        redis.delete(redis_keys.panel_login_failures(kind, value))


def record_failure(redis, attempt: Attempt) -> None:
    """The charged attempt failed: the subjects it brought to the limit are blocked."""
    limit, _window, block, _known = _settings()
    _block(redis, [(kind, value) for kind, value, count in attempt.charged if count >= limit],
           block)


# Gives a charge back only while its count lives: a count dropped by a block, or expired,
# must not come back as a negative one that never expires.
_REFUND = "if redis.call('exists', KEYS[1]) == 1 then redis.call('decr', KEYS[1]) end"


def record_success(redis, client_ip: str, email: str, attempt: Attempt) -> None:
    _limit, _window, _block_seconds, known_seconds = _settings()
    refund = redis.register_script(_REFUND)
    for kind, value, _count in attempt.charged:
        refund(keys=[redis_keys.panel_login_failures(kind, value)])
    if known_seconds:
        redis.set(redis_keys.panel_login_known(email, auth_network(client_ip)), 1,
                  ex=known_seconds)
