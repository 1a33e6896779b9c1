"""Client addresses and usernames blocked after too many failed SMTP AUTH attempts.

The SMTP proxy writes the blocks (``proxy/throttle.py``); the control panel lists and clears
them through these functions. All state is in Redis, so a clear takes effect on every proxy
instance at the next AUTH.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from outgoing import redis_keys

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


def split_subject(subject: str) -> tuple[str, str]:
    kind, _, value = subject.partition(":")
    return kind, value


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def list_blocks(redis, now: float, limit: int = 1000) -> list[AuthBlock]:
    """Blocks still in force at ``now``, the ones ending last first."""
    entries = redis.zrevrangebyscore(redis_keys.AUTH_BLOCKS, "+inf", f"({now!r}",
                                     start=0, num=limit, withscores=True)
    if not entries:
        return []
    with redis.pipeline(transaction=False) as pipe:
        for member, _ in entries:
            pipe.get(redis_keys.auth_block_info(_text(member)))
        infos = pipe.execute()
    blocks = []
    for (member, until), raw in zip(entries, infos, strict=True):
        subject = _text(member)
        kind, value = split_subject(subject)
        info = {}
        if raw:
            try:
                info = json.loads(raw)
            except ValueError:
                info = {}
        blocks.append(AuthBlock(subject=subject, kind=kind, value=value, until=float(until),
                                since=info.get("since"), failures=info.get("failures")))
    return blocks


def clear_block(redis, subject: str) -> bool:
    """Lift a block and forget the subject's recent failures; False when it was not blocked."""
    with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(redis_keys.AUTH_BLOCKS, subject)
        pipe.delete(redis_keys.auth_block_info(subject))
        pipe.delete(redis_keys.auth_failures(subject))
        removed, _, _ = pipe.execute()
    return bool(removed)
