"""The proxy's Redis pool (outgoing.redis_conn.HotPathPool) against a real Redis: it does
less per command than redis-py's own, and must keep what redis-py's guarantees: a reply
never goes to the wrong caller, a dropped connection is replaced, the limit holds, and
closing the client closes its connections."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from redis.asyncio import ConnectionPool
from redis.exceptions import ConnectionError, MaxConnectionsError

from outgoing import redis_conn


def run(coroutine):
    return asyncio.run(coroutine)


def test_the_proxy_gets_the_hot_path_pool_on_a_single_redis(redis_url):
    client = redis_conn.connect_async(redis_url)
    assert isinstance(client.connection_pool, redis_conn.HotPathPool)
    # RESP3 (maintenance notices work under the pool's lock): redis-py's own pool.
    resp3 = redis_conn.connect_async(redis_url + ("&" if "?" in redis_url else "?")
                                     + "protocol=3").connection_pool
    assert type(resp3) is ConnectionPool
    assert issubclass(resp3.connection_class, redis_conn._HiredisPacking)


def test_connections_are_reused_and_opened_only_for_concurrent_calls(redis_url):
    async def body():
        client = redis_conn.connect_async(redis_url)
        pool = client.connection_pool
        try:
            for n in range(50):
                await client.set("og:test:pool", n)
            assert await client.get("og:test:pool") == b"49"
            assert len(pool._available_connections) == 1 and not pool._in_use_connections
            # Ten callers waiting at once hold ten connections, and give all of them back.
            await asyncio.gather(*(client.blpop([f"og:test:pool:{i}"], timeout=0.2)
                                   for i in range(10)))
            assert len(pool._available_connections) == 10 and not pool._in_use_connections
        finally:
            await client.aclose()
        assert not any(c.is_connected for c in pool._available_connections)

    run(body())


def test_the_connection_limit_holds(redis_url):
    async def body():
        client = redis_conn.connect_async(redis_url, max_connections=2)
        try:
            with pytest.raises(MaxConnectionsError):
                await asyncio.gather(*(client.blpop([f"og:test:limit:{i}"], timeout=0.2)
                                       for i in range(3)))
            await asyncio.sleep(0.3)  # the two that got a connection finish
            assert await client.ping()
            assert len(client.connection_pool._in_use_connections) == 0
        finally:
            await client.aclose()

    run(body())


def test_a_cancelled_call_never_hands_its_reply_to_the_next_caller(redis_url, redis_client):
    """A caller cancelled while its reply is on the way (a session dropped, a timeout): the
    next caller on that connection must get its own reply, not the cancelled one's."""
    async def body():
        client = redis_conn.connect_async(redis_url)
        try:
            await client.set("og:test:mine", "mine")
            waiting = asyncio.ensure_future(client.blpop(["og:test:queue"], timeout=5))
            await asyncio.sleep(0.1)
            waiting.cancel()
            redis_client.rpush("og:test:queue", "theirs")  # the cancelled call's reply
            await asyncio.sleep(0.1)
            for _ in range(5):
                assert await client.get("og:test:mine") == b"mine"
        finally:
            await client.aclose()

    redis_client.delete("og:test:queue")
    run(body())


def test_a_connection_redis_dropped_is_replaced(redis_url, redis_client):
    """The call that finds the connection closed may fail, as with redis-py's own pool (the
    proxy answers it 4xx), or the connection check may catch it first; either way the next
    call gets a new connection."""
    async def body():
        client = redis_conn.connect_async(redis_url)
        try:
            ours = await client.client_id()
            redis_client.client_kill_filter(_id=ours)
            await asyncio.sleep(0.1)
            with contextlib.suppress(ConnectionError):
                await client.set("og:test:after", "maybe")
            assert await client.set("og:test:after", "ok")
            assert await client.get("og:test:after") == b"ok"
            assert await client.client_id() != ours
        finally:
            await client.aclose()

    run(body())
