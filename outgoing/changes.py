"""Tell every proxy instance that the configuration changed, so it reloads at once."""

from outgoing import redis_keys


def announce_config_change(redis) -> int:
    """Bump the configuration version (polled) and publish it (pushed)."""
    version = redis.incr(redis_keys.CONFIG_VERSION)
    redis.publish(redis_keys.CONFIG_CHANNEL, version)
    return version
