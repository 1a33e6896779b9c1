"""What a job needs from its process: configuration, a database session and Redis.

Built once per worker process on first use; jobs take ids as arguments and ask for these.
"""

from __future__ import annotations

from functools import cache

from outgoing import redis_conn
from outgoing.config import load_config
from outgoing.db import make_sessionmaker


@cache
def config() -> dict:
    return load_config()


@cache
def sessionmaker():
    return make_sessionmaker(config()["DATABASE_URL"])


@cache
def redis_client():
    """Counters, locks and throttles on REDIS_URL (maybe a cluster); jobs this worker
    enqueues go to RQ_REDIS_URL, the Redis it serves."""
    return redis_conn.connect(config()["REDIS_URL"], rq_url=config()["RQ_REDIS_URL"])
