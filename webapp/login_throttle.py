"""Password guessing on the panel's login form is throttled like SMTP AUTH.

``AUTH_FAILURE_LIMIT`` failed logins within ``AUTH_FAILURE_WINDOW_SECONDS`` block the client
address for ``AUTH_BLOCK_SECONDS``, and block the admin's email the same way, except from
networks (/24, /64) the admin logged in from within ``AUTH_KNOWN_NETWORK_DAYS``: guessing
from elsewhere cannot lock the owner out. While blocked, no password is checked, not even
the right one. With Redis unreachable the form still works, unthrottled (logged).

The client is the connection's address; for a connection from loopback (a reverse proxy on
the same machine, as README's "Going live" has it) the address that proxy appended last to
``X-Forwarded-For``, so one guesser behind the proxy does not block every admin's login. A
header from anyone else is ignored: a remote client cannot pick its own address.
"""

from __future__ import annotations

import ipaddress
import math

from flask import current_app, request

from outgoing import redis_keys
from scoring.locks import auth_network

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


def blocked_for(redis, client_ip: str, email: str) -> int:
    """Seconds this login attempt must wait (0: go ahead)."""
    limit, _window, _block, known_seconds = _settings()
    if limit <= 0:
        return 0
    wait = redis.ttl(redis_keys.panel_login_block(IP, client_ip))
    account = redis.ttl(redis_keys.panel_login_block(EMAIL, email))
    if account > 0 and not (known_seconds and redis.exists(
            redis_keys.panel_login_known(email, auth_network(client_ip)))):
        wait = max(wait, account)
    return max(wait, 0)


def record_failure(redis, client_ip: str, email: str) -> None:
    limit, window, block, known_seconds = _settings()
    if limit <= 0:
        return
    subjects = [(IP, client_ip)]
    if not (known_seconds and redis.exists(
            redis_keys.panel_login_known(email, auth_network(client_ip)))):
        subjects.append((EMAIL, email))
    for kind, value in subjects:
        key = redis_keys.panel_login_failures(kind, value)
        count = redis.incr(key)
        if count == 1:
            redis.expire(key, window)
        if count >= limit:
            redis.set(redis_keys.panel_login_block(kind, value), 1, ex=block)
            redis.delete(key)


def record_success(redis, client_ip: str, email: str) -> None:
    _limit, _window, _block, known_seconds = _settings()
    if known_seconds:
        redis.set(redis_keys.panel_login_known(email, auth_network(client_ip)), 1,
                  ex=known_seconds)
