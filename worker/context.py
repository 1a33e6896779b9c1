"""What a job needs from its process: configuration, a database session and Redis.

Built once per worker process on first use; jobs take ids as arguments and ask for these.
"""

from __future__ import annotations

from functools import cache

import redis

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
    return redis.from_url(config()["REDIS_URL"])
