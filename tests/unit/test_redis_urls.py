"""How REDIS_URL names a Redis Cluster, and RQ kept on one Redis server of its own."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import DataError

from outgoing import redis_conn
from outgoing.config import ConfigError, load_config

CLUSTER = "redis+cluster://:s%40cret@10.0.1.1:7000,10.0.1.2,[2001:db8::3]:7002"


def test_a_cluster_url_lists_its_seed_nodes_and_credentials():
    nodes, options = redis_conn.cluster_nodes(CLUSTER)
    assert nodes == [("10.0.1.1", 7000), ("10.0.1.2", 6379), ("2001:db8::3", 7002)]
    assert options == {"ssl": False, "password": "s@cret"}
    assert redis_conn.cluster_nodes("rediss+cluster://a:1")[1] == {"ssl": True}
    assert redis_conn.is_cluster_url(CLUSTER)
    assert not redis_conn.is_cluster_url("redis://127.0.0.1:6379/0")


def test_the_proxy_gets_redis_pys_cluster_client_for_a_cluster_url():
    client = redis_conn.connect_async(CLUSTER, socket_timeout=1)
    assert isinstance(client, AsyncRedisCluster) and redis_conn.is_cluster(client)


ARGUMENTS = [("SET", "k", "v"), ("CONFIG GET", "maxmemory"), (b"CLIENT SETNAME", b"og"),
             ("EVALSHA", "a" * 40, 2, "og:{1}:k", "og:{1}:l", 1.5, 1 / 3, 1e20, -3, 0,
              "ünïcode", b"\x00\xff")]


def test_the_proxys_clients_pack_commands_in_c_into_the_same_bytes():
    from redis.asyncio.connection import Connection, SSLConnection

    single = redis_conn.connect_async("redis://127.0.0.1:6379/0").connection_pool
    cluster = redis_conn.connect_async(CLUSTER)
    assert issubclass(single.connection_class, redis_conn._HiredisPacking)
    assert issubclass(cluster.connection_kwargs["connection_class"], redis_conn._HiredisPacking)
    assert all(issubclass(node.connection_class, redis_conn._HiredisPacking)
               for node in cluster.startup_nodes)
    secure = redis_conn.connect_async("rediss://127.0.0.1:6380/0").connection_pool
    assert issubclass(secure.connection_class, SSLConnection)
    ours, theirs = single.connection_class(), Connection()
    for args in ARGUMENTS:
        assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args))
    for bad in (None, True, 1j):
        with pytest.raises(DataError):
            ours.pack_command("SET", bad)


def config(tmp_path, **environ):
    return load_config(environ={"INSTANCE_PATH": str(tmp_path), **environ})


def test_rq_needs_its_own_single_redis_next_to_a_cluster(tmp_path):
    with pytest.raises(ConfigError, match="RQ_REDIS_URL: required"):
        config(tmp_path, REDIS_URL=CLUSTER)
    with pytest.raises(ConfigError, match="RQ_REDIS_URL: RQ does not support Redis Cluster"):
        config(tmp_path, REDIS_URL=CLUSTER, RQ_REDIS_URL=CLUSTER)
    loaded = config(tmp_path, REDIS_URL=CLUSTER, RQ_REDIS_URL="redis://10.0.1.10:6379/0")
    assert loaded["REDIS_URL"] == CLUSTER


@pytest.mark.parametrize("url", ["redis+cluster://", "redis+cluster://a:1/3",
                                 "redis+cluster://a:99999"])
def test_a_malformed_cluster_url_names_the_setting(tmp_path, url):
    with pytest.raises(ConfigError, match="REDIS_URL"):
        config(tmp_path, REDIS_URL=url, RQ_REDIS_URL="redis://127.0.0.1:6379/0")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0?protocol=abc",
                                 "redis://127.0.0.1:6379/x", "unix:///tmp/r.sock?db=two",
                                 "redis://127.0.0.1:6379/0?protocol=3%00",
                                 "redis://127.0.0.1:6379/0?protocol=4",
                                 "redis://127.0.0.1:6379/0?protocol=0"])
def test_a_bad_option_in_a_redis_url_names_the_setting(tmp_path, url):
    """The proxy reads the URL's options (``protocol`` picks its pool): a bad one is a
    configuration error at start, not a traceback from redis-py."""
    with pytest.raises(ConfigError, match="^REDIS_URL: "):
        config(tmp_path, REDIS_URL=url)
