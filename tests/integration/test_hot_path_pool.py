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
from redis.exceptions import TimeoutError as RedisTimeoutError

from outgoing import redis_conn


def run(coroutine):
    return asyncio.run(coroutine)


def test_the_proxy_gets_the_hot_path_pool_on_a_single_redis(redis_url):
    client = redis_conn.connect_async(redis_url)
    assert isinstance(client.connection_pool, redis_conn.HotPathPool)

    async def spoken() -> tuple[bytes, list]:
        try:
            info = await client.execute_command("CLIENT", "INFO")
            return info, [c.protocol for c in client.connection_pool._available_connections]
        finally:
            await client.aclose()

    # RESP2 (no maintenance notices), though redis-py 8 speaks RESP3 unless told otherwise:
    # as the connection negotiated it, and as the server saw it (Redis 7 and later say).
    info, protocols = run(spoken())
    assert [str(p) for p in protocols] == ["2"]
    assert dict(field.split(b"=", 1) for field in info.split()).get(b"resp", b"2") == b"2"
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


def test_a_command_is_written_without_a_task_of_its_own(redis_url):
    """With a socket timeout (the proxy's), redis-py bounds each write by ``wait_for``, a new
    task per command on Python 3.11; a command that goes out at once needs none."""
    async def body():
        client = redis_conn.connect_async(redis_url, socket_timeout=5)
        loop = asyncio.get_running_loop()
        made = []

        def factory(loop, coroutine, **kwargs):
            made.append(coroutine)
            return asyncio.Task(coroutine, loop=loop, **kwargs)

        try:
            await client.set("og:test:direct", "1")  # connected before counting
            loop.set_task_factory(factory)
            for _ in range(20):
                assert await client.incr("og:test:direct") > 1
        finally:
            loop.set_task_factory(None)
            await client.aclose()
        assert made == []

    run(body())


def test_a_write_the_server_does_not_take_times_out_and_drops_the_connection():
    """A server that stops reading: the write of a large command waits under the socket
    timeout, fails as redis-py's own would, and the connection is not reused."""
    async def body():
        accepted = []

        async def stalled(reader, writer):  # takes the connection, never reads from it
            accepted.append(writer)

        server = await asyncio.start_server(stalled, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = redis_conn.connect_async(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3,
                                          retry=None, driver_info=None)  # no handshake
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(RedisTimeoutError, match="writing"):
                await client.set("og:test:big", b"x" * (64 << 20))
            assert asyncio.get_running_loop().time() - started < 5
            pool = client.connection_pool
            assert not pool._in_use_connections
            assert not any(c.is_connected for c in pool._available_connections)
        finally:
            await client.aclose()
            for writer in accepted:
                writer.close()
            server.close()
            await server.wait_closed()

    run(body())


def test_a_connection_given_back_with_a_reply_unread_is_not_reused_as_it_is(redis_url):
    """A reply left on a connection (its reader went away) must not become the next
    caller's: the pool checks a connection before handing it out."""
    async def body():
        client = redis_conn.connect_async(redis_url)
        pool = client.connection_pool
        try:
            await client.set("og:test:mine", "mine")
            connection = await pool.get_connection()
            await connection.send_command("ECHO", "stale")  # the reply is never read
            await asyncio.sleep(0.1)
            await pool.release(connection)
            assert await client.get("og:test:mine") == b"mine"
        finally:
            await client.aclose()

    run(body())
