"""Hash-slot discipline: every Lua script, every MULTI/EXEC and every multi-key command the
product sends touches keys of one Redis Cluster slot, or a cluster refuses it (CROSSSLOT).

The real code runs against the test Redis through clients whose connections record every
command they send; the server says which arguments are keys (COMMAND GETKEYS) and
``redis.cluster``'s ``key_slot`` computes their slots."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest
import redis as redis_lib
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection as AsyncConnection
from redis.asyncio.connection import UnixDomainSocketConnection as AsyncUnixConnection
from redis.cluster import key_slot
from redis.connection import Connection, UnixDomainSocketConnection

from outgoing import auth_blocks, locks, redis_keys
from outgoing.models import Identity
from proxy import counters, detection, identities, throttle
from scoring import risk
from scoring.limits import CONNECTION_WINDOWS
from worker import abuse

SENT: list[tuple[str, ...]] = []


def _text(arg) -> str:
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


class Recording:
    """Mixed into a connection class: every command packed is recorded."""

    def pack_command(self, *args):
        SENT.append(tuple(_text(a) for a in args))
        return super().pack_command(*args)


def recording(base: type) -> type:
    return type(f"Recording{base.__name__}", (Recording, base), {})


ATOMIC_MULTI_KEY = {"DEL", "UNLINK", "MGET", "MSET", "EXISTS", "RENAME", "SUNIONSTORE",
                    "ZUNIONSTORE", "ZINTERSTORE", "ZMSCORE", "LMOVE", "SMOVE", "COPY"}


def atomic_units(sent: list[tuple[str, ...]]) -> list[list[tuple[str, ...]]]:
    """The commands that must stay in one slot together: each script call, each multi-key
    command, and each MULTI ... EXEC block."""
    units, block = [], None
    for command in sent:
        name = command[0].upper()
        if name == "MULTI":
            block = []
        elif name == "EXEC":
            units.append(block)
            block = None
        elif block is not None:
            block.append(command)
        elif name in ("EVAL", "EVALSHA", "FCALL") or name in ATOMIC_MULTI_KEY:
            units.append([command])
    return units


def slots_of(client, unit) -> set[int]:
    keys = []
    for command in unit:
        try:
            keys += [_text(k) for k in client.command_getkeys(*command)]
        except redis_lib.ResponseError:  # a command without keys
            continue
    return {key_slot(key.encode()) for key in keys}


@pytest.fixture
def recorded(redis_url, redis_client):
    if redis_url.startswith("unix://"):  # dev.py test's embedded Redis; from_url would
        path = urlsplit(redis_url).path  # put its own connection class back
        sync = redis_lib.Redis(connection_pool=redis_lib.ConnectionPool(
            connection_class=recording(UnixDomainSocketConnection), path=path))
        async_pool = aioredis.ConnectionPool(
            connection_class=recording(AsyncUnixConnection), path=path)
    else:
        sync = redis_lib.Redis(connection_pool=redis_lib.ConnectionPool.from_url(
            redis_url, connection_class=recording(Connection)))
        async_pool = aioredis.ConnectionPool.from_url(
            redis_url, connection_class=recording(AsyncConnection))
    SENT.clear()
    yield sync, async_pool
    sync.close()


async def _drive_proxy(pool) -> None:
    client = aioredis.Redis(connection_pool=pool)
    now = 1_800_000_000.0
    limits = {window: 100 for window in CONNECTION_WINDOWS}
    check = await counters.check_mail(client, 42, now, connection_limits=limits,
                                      maximum_recipients_per_day=100)
    await counters.check_mail(client, 42, now, connection_limits=None,
                              maximum_recipients_per_day=100,
                              give_back=check.fields[counters.RECIPIENTS])
    await counters.count_recipient(client, 42, 100, now)
    await counters.record_spam_event(client, counters.spam_key(42), now)
    await counters.record_spam_event(client, counters.spam_key(42, "bob@example.com"), now)
    await identities.check_and_count(client, 42, "bob@example.com")
    await identities.check_and_count(client, 43, "carol@example.com")
    # Compromise detection with the identity check folded in (without a content
    # fingerprint: with one, a single Redis also counts the content's senders in the same
    # call, another slot's key; on a Cluster that is a call of its own).
    await detection.measure(client, 42, detection.Evidence(
        identity="bob@example.com", recipients=("r@example.org",)),
        risk.Settings(enabled=True), now, check_identity=True)
    flusher = identities.IdentityFlusher(client, None, lambda: now)
    flusher.dirty = {42, 43}
    flusher._write = lambda batches, when: 0  # the database is not this test's subject
    await flusher.flush()
    policy = throttle.ThrottlePolicy(limit=2)
    for _ in range(2):
        await throttle.record_failure(client, "192.0.2.7", "alice@example.com", now, policy)
    await throttle.check(client, "192.0.2.7", "alice@example.com", now, policy)
    await throttle.check(client, "192.0.2.8", "carol@example.com", now, policy, success=True,
                         ask_failures=True)
    # An attempt's slot while its password is checked: reserved, then released or turned
    # into the failure.
    await throttle.check(client, "192.0.2.9", "dave@example.com", now, policy, reserve="t1")
    await throttle.release(client, "192.0.2.9", "dave@example.com", "t1")
    await throttle.check(client, "192.0.2.9", "dave@example.com", now, policy, reserve="t2")
    await throttle.record_failure(client, "192.0.2.9", "dave@example.com", now, policy,
                                  release="t2")
    await client.aclose()


def test_every_script_and_transaction_touches_one_hash_slot(recorded, redis_client):
    sync, pool = recorded
    asyncio.run(_drive_proxy(pool))
    auth_blocks.clear_block(sync, redis_keys.auth_subject_ip("192.0.2.7"))
    abuse_bucket = abuse.bucket_key(7, 1_800_000_000)
    sync.eval(abuse._DECIDE, 1, abuse_bucket, "1", abuse.REPORTS_PER_HOUR, 60)
    locks.unlock(None, sync, Identity(user_id=42, value="bob@example.com", locked=False),
                 actor="test", reason="test")

    units = atomic_units(SENT)
    names = {command[0].upper() for unit in units for command in unit}
    # The scripts (limits, identity lock and count, identity take, abuse decision), the
    # transactions (spam window, AUTH failures and blocks, clearing a block) and DEL all ran.
    assert {"EVALSHA", "ZADD", "DEL"} <= names
    assert sum(1 for unit in units if unit[0][0].upper() == "EVALSHA") >= 6
    crossing = [(unit, slots_of(redis_client, unit)) for unit in units
                if len(slots_of(redis_client, unit)) > 1]
    assert crossing == []


def test_a_users_keys_share_its_slot():
    keys = [redis_keys.user_lock(42), redis_keys.user_limits(42), redis_keys.user_spam(42),
            redis_keys.identity_lock(42, "Bob@Example.com"),
            redis_keys.identity_spam(42, "bob@example.com"), redis_keys.identity_counts(42)]
    assert len({key_slot(key.encode()) for key in keys}) == 1
    auth = [redis_keys.AUTH_BLOCKS, redis_keys.auth_failures("ip:192.0.2.7"),
            redis_keys.auth_block_info("user:alice@example.com"),
            redis_keys.auth_networks("alice@example.com")]
    assert len({key_slot(key.encode()) for key in auth}) == 1
