"""Client addresses and usernames blocked after too many failed SMTP AUTH attempts.

The SMTP proxy writes the blocks (``proxy/throttle.py``); the control panel lists and clears
them through these functions. All state is in Redis, so a clear takes effect on every proxy
instance at the next AUTH. An address block refuses every login from that address; a
username block refuses that login only from networks it has not logged in from successfully
in the last ``AUTH_KNOWN_NETWORK_DAYS`` days, which are listed with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from outgoing import redis_keys
from scoring.locks import AUTH_KNOWN_NETWORK_DAYS, auth_known_network_since

IP = "ip"
USER = "user"


@dataclass(frozen=True)
class AuthBlock:
    subject: str  # "ip:<address>" or "user:<username>"
    kind: str  # IP or USER
    value: str  # the address or the username
    until: float  # epoch seconds
    since: float | None
    failures: int | None
    # A username block: the networks (newest first) it does not apply to.
    known_networks: tuple[str, ...] = ()


def split_subject(subject: str) -> tuple[str, str]:
    kind, _, value = subject.partition(":")
    return kind, value


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def scope(kind: str, known_network_days: float = AUTH_KNOWN_NETWORK_DAYS) -> str:
    """Which logins a block of this kind refuses, in the panel's words."""
    if kind == IP:
        return "all logins from this address"
    if known_network_days and known_network_days > 0:
        days = f"{known_network_days:g}"
        return (f"from networks it has not logged in from in the last {days} "
                f"day{'' if days == '1' else 's'}")
    return "from every address"


def list_blocks(redis, now: float, limit: int = 1000,
                known_network_days: float = AUTH_KNOWN_NETWORK_DAYS) -> list[AuthBlock]:
    """Blocks still in force at ``now``, the ones ending last first; a username block with
    the networks it does not apply to."""
    entries = redis.zrevrangebyscore(redis_keys.AUTH_BLOCKS, "+inf", f"({now!r}",
                                     start=0, num=limit, withscores=True)
    if not entries:
        return []
    since = auth_known_network_since(now, days=known_network_days)
    subjects = [_text(member) for member, _ in entries]
    asks = [split_subject(subject)[0] == USER and known_network_days > 0
            for subject in subjects]
    with redis.pipeline(transaction=False) as pipe:
        for subject, ask in zip(subjects, asks, strict=True):
            pipe.get(redis_keys.auth_block_info(subject))
            if ask:
                pipe.zrevrangebyscore(redis_keys.auth_networks(split_subject(subject)[1]),
                                      "+inf", f"({since!r}")
        replies = iter(pipe.execute())
    blocks = []
    for subject, (_, until), ask in zip(subjects, entries, asks, strict=True):
        raw = next(replies)
        known = next(replies) if ask else []
        kind, value = split_subject(subject)
        info = {}
        if raw:
            try:
                info = json.loads(raw)
            except ValueError:
                info = {}
        blocks.append(AuthBlock(subject=subject, kind=kind, value=value, until=float(until),
                                since=info.get("since"), failures=info.get("failures"),
                                known_networks=tuple(_text(n) for n in known)))
    return blocks


def clear_block(redis, subject: str) -> bool:
    """Lift a block and forget the subject's recent failures; False when it was not blocked."""
    with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(redis_keys.AUTH_BLOCKS, subject)
        pipe.delete(redis_keys.auth_block_info(subject))
        pipe.delete(redis_keys.auth_failures(subject))
        removed, _, _ = pipe.execute()
    return bool(removed)
