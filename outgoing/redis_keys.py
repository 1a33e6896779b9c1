"""Redis key names in one place.

Per-user keys carry the user id as a hash tag (``og:{42}:...``) so that all keys of one user
live in one Redis Cluster slot and one Lua script may touch them together.
"""

CONFIG_VERSION = "og:config-version"
CONFIG_CHANNEL = "og:config"


def user_lock(user_id: int) -> str:
    return f"og:{{{user_id}}}:lock"


def identity_lock(user_id: int, identity: str) -> str:
    return f"og:{{{user_id}}}:idlock:{identity.lower()}"


def user_spam(user_id: int) -> str:
    return f"og:{{{user_id}}}:spam"


def identity_spam(user_id: int, identity: str) -> str:
    return f"og:{{{user_id}}}:idspam:{identity.lower()}"


def user_limits(user_id: int) -> str:
    """The user's hash of limit-window buckets (see proxy/limits.lua)."""
    return f"og:{{{user_id}}}:limits"
