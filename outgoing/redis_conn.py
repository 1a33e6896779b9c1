"""Redis clients for counters, locks and throttles: one Redis server, or a Redis Cluster.

``REDIS_URL`` names a cluster with its own scheme and a list of seed nodes::

    redis+cluster://[user:password@]host:port[,host:port...]     (rediss+cluster:// for TLS)

An explicit scheme rather than asking the server at start-up whether it is a cluster node:
start-up must not depend on the first node being up, and a typo must not silently turn a
cluster into a single-node client (whose scripts would then fail with MOVED on every other
slot). Several seeds, so that any one of them answering is enough to learn the topology.

RQ does not support Redis Cluster, so jobs always go to the single Redis of ``RQ_REDIS_URL``
(``outgoing.config`` refuses a cluster URL there). ``connect`` hangs that connection on the
data client as ``rq_connection`` whenever it differs from the data client, and
``outgoing.jobs`` enqueues through ``rq_connection(client)``: the callers keep passing the
one client they have.
"""

from __future__ import annotations

import asyncio
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import parse_url
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, MaxConnectionsError, RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

try:  # the C command packer; redis-py's blocking client uses it already, asyncio's does not
    from hiredis import pack_command as _hiredis_pack_command
except ImportError:  # pragma: no cover - hiredis is a dependency; plain redis-py still works
    _hiredis_pack_command = None

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
DEFAULT_PORT = 6379


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], dict]:
    """The seed nodes of a ``redis+cluster://`` URL and the client options it carries
    (username, password, ssl). ValueError names what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a cluster URL: {url!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    options: dict = {"ssl": CLUSTER_SCHEMES[parts.scheme]}
    if userinfo:
        user, _, password = userinfo.partition(":")
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
    if parts.path not in ("", "/", "/0"):
        raise ValueError("a cluster has only database 0")
    nodes = []
    for seed in hosts.split(","):
        seed = seed.strip()
        if seed.startswith("["):  # [v6]:port
            host, _, port = seed[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = seed.rpartition(":") if ":" in seed else (seed, "", "")
        if not host:
            raise ValueError(f"no host in seed {seed!r}")
        if port and (not port.isdigit() or not 0 < int(port) < 65536):
            raise ValueError(f"bad port in seed {seed!r}")
        nodes.append((host, int(port) if port else DEFAULT_PORT))
    return nodes, options


def connect(url: str, *, rq_url: str | None = None, **options):
    """A blocking client for ``url`` (``redis.Redis`` or ``redis.cluster.RedisCluster``);
    ``rq_url``, when given and different, becomes its ``rq_connection``."""
    if is_cluster_url(url):
        nodes, extra = cluster_nodes(url)
        options.pop("health_check_interval", None)
        client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes],
                              **extra, **options)
    else:
        client = redis.from_url(url, **options)
    if rq_url and rq_url != url:
        client.rq_connection = redis.from_url(rq_url, **options)
    return client


class _HiredisPacking:
    """Commands packed by hiredis in C, as redis-py's blocking client does
    (``redis.connection.HiredisRespSerializer``). redis-py's asyncio connections pack in
    Python, about 2 µs per argument: 80 µs for the detection script's call, most of what
    detection cost the proxy. Same bytes on the wire (UTF-8 text, ``repr`` of numbers)."""

    def pack_command(self, *args) -> list[bytes]:
        if isinstance(args[0], str):  # "CONFIG GET" and the like: one argument per word
            args = tuple(args[0].encode().split()) + args[1:]
        elif b" " in args[0]:
            args = tuple(args[0].split()) + args[1:]
        try:
            return [_hiredis_pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from exc


class _DirectWrites:
    """A command written without a task of its own. redis-py bounds the write of every
    command by ``socket_timeout`` through ``asyncio.wait_for``, which on Python 3.11 wraps the
    write in a new task: a task and an extra turn of the event loop per command, about 4 %
    of the proxy's CPU, to wait for a drain that does not wait when the command went out at
    once. The timeout still bounds every wait: when the transport kept part of the command
    in its buffer, the drain waits under ``wait_for`` as before. Errors are redis-py's."""

    async def send_packed_command(self, command, check_health: bool = True) -> None:
        if not self.socket_timeout or not self.is_connected:
            return await super().send_packed_command(command, check_health)
        if check_health:
            await self.check_health()
            if not self.is_connected:  # the health check's ping failed and disconnected
                return await super().send_packed_command(command, check_health=False)
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        writer = self._writer
        try:
            writer.writelines(command)
            if writer.transport.get_write_buffer_size():  # drain may wait: bounded
                await asyncio.wait_for(writer.drain(), self.socket_timeout)
            else:  # all sent: drain only reports a lost connection, without waiting
                await writer.drain()
        except TimeoutError:  # before OSError, of which it is one
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as e:
            await self.disconnect(nowait=True)
            err_no, message = (e.args if len(e.args) == 2 else ("UNKNOWN", e))
            raise RedisConnectionError(
                f"Error {err_no} while writing to socket. {message}.") from e
        except BaseException:
            await self.disconnect(nowait=True)  # a half-written command: no reuse
            raise


_FAST_CLASSES: dict[type, type] = {}


def with_c_packing(connection_class: type) -> type:
    """``connection_class`` packing its commands with hiredis (itself without hiredis) and
    writing them without a task of their own."""
    if connection_class not in _FAST_CLASSES:
        mixins = (_DirectWrites,) + ((_HiredisPacking,) if _hiredis_pack_command else ())
        _FAST_CLASSES[connection_class] = type(connection_class.__name__,
                                               (*mixins, connection_class), {})
    return _FAST_CLASSES[connection_class]


class HotPathPool(aioredis.ConnectionPool):
    """redis-py's asyncio pool without the work per command that the proxy has no use for.

    Since 5.3, redis-py's pool takes a lock, records three OpenTelemetry connection counts
    (with telemetry off, each still looks its provider up) and dispatches a "released" event
    (for streaming credential providers) around every command: 120-140 µs of CPU per script
    call on a 2-core machine, against 80-95 µs with this pool, which hands connections out as
    5.2's did. One event loop owns the pool, so a pop and an add need no lock; the check
    that a connection handed out is connected and has nothing left unread stays
    (``ensure_connection``), and so does the reconnect a connection asks for on release."""

    async def get_connection(self, command_name=None, *keys, **options):
        try:
            connection = self._available_connections.pop()
        except IndexError:
            if len(self._in_use_connections) >= self.max_connections:
                raise MaxConnectionsError("Too many connections") from None
            connection = self.make_connection()
        self._in_use_connections.add(connection)
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def ensure_connection(self, connection) -> None:
        """redis-py's check, without going through ``connect()`` (a retry wrapper around a
        call that returns at once) for a connection that is connected and has nothing left
        unread, the usual case; anything else gets redis-py's own check and reconnect."""
        try:
            if connection.is_connected and not await connection.can_read():
                return
        except (RedisConnectionError, RedisTimeoutError, OSError):
            pass
        await super().ensure_connection(connection)

    async def release(self, connection) -> None:
        self._in_use_connections.remove(connection)
        if connection.should_reconnect():
            await connection.disconnect()
        self._available_connections.append(connection)


def connect_async(url: str, **options):
    """An asyncio client for ``url`` (the proxy's hot path), packing commands in C, its
    connections handed out by ``HotPathPool`` on a single Redis."""
    if is_cluster_url(url):
        nodes, extra = cluster_nodes(url)
        client = AsyncRedisCluster(startup_nodes=[AsyncClusterNode(h, p) for h, p in nodes],
                                   **extra, **options)
        # Nodes found later are made from these options; the seeds exist already.
        fast = with_c_packing(client.connection_kwargs["connection_class"])
        client.connection_kwargs["connection_class"] = fast
        for node in client.startup_nodes:
            node.connection_class = fast
        return client
    settings = {**parse_url(url), **options}
    # RESP2 unless the URL asks for RESP3 (redis-py 8's default): RESP3's maintenance notices
    # and streaming credentials re-authenticate or drop idle connections while holding the
    # pool's lock, so they need redis-py's own pool; the proxy needs neither.
    if "protocol" not in settings:
        options["protocol"] = 2
    locked = str(settings.get("protocol", 2)) == "3" or settings.get("credential_provider")
    pool = (aioredis.ConnectionPool if locked else HotPathPool).from_url(url, **options)
    pool.connection_class = with_c_packing(pool.connection_class)
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def rq_connection(client) -> redis.Redis:
    """The single Redis that RQ uses next to the data client ``client``."""
    found = getattr(client, "rq_connection", None)
    if found is not None:
        return found
    if is_cluster(client):
        raise RedisClusterException("RQ needs its own Redis: set RQ_REDIS_URL")
    return client


_CLUSTERS = (RedisCluster, AsyncRedisCluster)  # a tuple: isinstance with a union is slower


_cluster_types: dict[type, bool] = {}


def is_cluster(client) -> bool:
    """Known per class: redis-py's clients derive from a ``typing.Protocol``, which makes a
    plain isinstance cost microseconds, and the proxy asks for every message."""
    kind = type(client)
    found = _cluster_types.get(kind)
    if found is None:
        found = _cluster_types[kind] = isinstance(client, _CLUSTERS)
    return found
