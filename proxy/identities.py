"""Identities on the hot path: the lock check and the message count in one round trip, and a
background task that writes the counts to the database in batches.

Per message the proxy runs one script on the user's hash-tagged keys: if the user (locked
since MAIL) or the identity is locked it answers with the lock, else it adds one to
``m:<identity>`` in the user's pending counts hash. Every few seconds the flusher takes each
touched user's hash (read and delete in one script, so two proxy instances never write the
same counts twice) and upserts it into the identities table. If the database is down the
counts go back into Redis for the next try.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from outgoing import redis_keys
from outgoing.db import session_scope
from outgoing.identities import record_counts
from outgoing.redis_conn import is_cluster
from proxy.scripts import LuaScript

log = logging.getLogger(__name__)

# KEYS[1] the user's lock, KEYS[2] the identity's lock and KEYS[3] the user's pending counts
# (both absent for a message without an identity). A lock set since MAIL checked the user's
# stops the message here, in the call the message makes anyway.
CHECK_AND_COUNT_LUA = """
local lock = redis.call("GET", KEYS[1])
if lock then
  return {"user", lock}
end
if KEYS[2] then
  lock = redis.call("GET", KEYS[2])
  if lock then
    return {"identity", lock}
  end
  redis.call("HINCRBY", KEYS[3], ARGV[1], 1)
end
return false
"""
CHECK_AND_COUNT = LuaScript(CHECK_AND_COUNT_LUA)

USER, IDENTITY = "user", "identity"

TAKE_LUA = """
local pending = redis.call("HGETALL", KEYS[1])
if #pending > 0 then
  redis.call("DEL", KEYS[1])
end
return pending
"""

_scripts: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _script(redis, name: str, source: str):
    per_client = _scripts.setdefault(redis, {})
    if name not in per_client:
        per_client[name] = redis.register_script(source)
    return per_client[name]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


async def check_and_count(redis, user_id: int,
                          identity: str | None) -> tuple[str, str] | None:
    """What refuses the message after DATA: (``USER``, the lock's JSON) when the user was
    locked after MAIL checked it, (``IDENTITY``, JSON) when the identity is locked; else
    count the identity's message (when it has one) and return None."""
    keys = [redis_keys.user_lock(user_id)]
    args = []
    if identity:
        keys += [redis_keys.identity_lock(user_id, identity),
                 redis_keys.identity_counts(user_id)]
        args = [redis_keys.identity_count_field("m", identity)]
    found = await CHECK_AND_COUNT(redis, keys, args)
    if not found:
        return None
    return _text(found[0]), _text(found[1])


async def count_spam(redis, user_id: int, identity: str) -> None:
    await redis.hincrby(redis_keys.identity_counts(user_id),
                        redis_keys.identity_count_field("s", identity), 1)


def parse_pending(raw: list | dict) -> dict[str, tuple[int, int]]:
    """``[field, value, ...]`` of a pending counts hash -> {identity: (messages, spam)}."""
    items = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, value in items:
        kind, _, identity = _text(name).partition(":")
        if kind in ("m", "s") and identity:
            counts[identity][0 if kind == "m" else 1] += int(value)
    return {identity: (m, s) for identity, (m, s) in counts.items()}


class IdentityFlusher:
    """Writes pending identity counts of the users this process touched, every ``interval``."""

    def __init__(self, redis, sessionmaker, clock, interval: float = 2.0):
        self.redis = redis
        self.sessionmaker = sessionmaker
        self.clock = clock
        self.interval = interval
        self.dirty: set[int] = set()

    def mark(self, user_id: int) -> None:
        self.dirty.add(user_id)

    async def recover(self) -> None:
        """Pick up counts a stopped proxy left in Redis (once, at start)."""
        async for key in self.redis.scan_iter(match=redis_keys.IDENTITY_COUNTS_PATTERN,
                                              count=1000):
            name = _text(key)
            try:
                self.mark(int(name[name.index("{") + 1:name.index("}")]))
            except ValueError:
                continue

    async def run(self) -> None:
        try:
            await self.recover()
        except Exception as exc:
            log.warning("could not look for pending identity counts: %s", exc)
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("identity flush failed; will retry")

    async def flush(self) -> int:
        """Move pending counts to the database; returns how many identities were written."""
        if not self.dirty:
            return 0
        users = sorted(self.dirty)
        self.dirty = set()
        take = _script(self.redis, "take", TAKE_LUA)
        try:
            if is_cluster(self.redis):
                # A cluster pipeline cannot load a script on the node it lands on; the
                # users' keys are spread over the slots anyway: one call each, concurrently.
                taken = await asyncio.gather(
                    *(take(keys=[redis_keys.identity_counts(user_id)]) for user_id in users),
                    return_exceptions=True)
                failed = [u for u, r in zip(users, taken, strict=True) if isinstance(r, Exception)]
                if failed:  # e.g. a slot whose master is failing over: those users next time
                    self.dirty.update(failed)
                    taken = [None if isinstance(r, Exception) else r for r in taken]
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for user_id in users:
                        await take(keys=[redis_keys.identity_counts(user_id)], client=pipe)
                    taken = await pipe.execute()
        except Exception:
            self.dirty.update(users)
            raise
        batches = {user_id: parse_pending(raw) for user_id, raw in zip(users, taken, strict=True)
                   if raw}
        if not batches:
            return 0
        now = datetime.fromtimestamp(self.clock(), UTC).replace(tzinfo=None)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, self._write, batches, now)
        except Exception:
            await self._put_back(batches)
            raise

    def _write(self, batches: dict[int, dict[str, tuple[int, int]]], now: datetime) -> int:
        from sqlalchemy.exc import IntegrityError

        try:
            with session_scope(self.sessionmaker) as db:
                return sum(record_counts(db, user_id, counts, now)
                           for user_id, counts in batches.items())
        except IntegrityError:
            pass  # a user was deleted meanwhile: write the others one by one
        written = 0
        for user_id, counts in batches.items():
            try:
                with session_scope(self.sessionmaker) as db:
                    written += record_counts(db, user_id, counts, now)
            except IntegrityError:
                log.info("dropping identity counts of deleted outgoing user %s", user_id)
        return written

    async def _put_back(self, batches: dict[int, dict[str, tuple[int, int]]]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for user_id, counts in batches.items():
                    key = redis_keys.identity_counts(user_id)
                    for identity, (messages, spam) in counts.items():
                        if messages:
                            pipe.hincrby(key, redis_keys.identity_count_field("m", identity),
                                         messages)
                        if spam:
                            pipe.hincrby(key, redis_keys.identity_count_field("s", identity),
                                         spam)
                await pipe.execute()
        except Exception as exc:
            log.error("lost identity counts of %d users (%s)", len(batches), exc)
            return
        self.dirty.update(batches)
