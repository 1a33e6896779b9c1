"""Redis key names in one place.

Per-user keys carry the user id as a hash tag (``og:{42}:...``) so that all keys of one user
live in one Redis Cluster slot and one Lua script may touch them together.
"""

CONFIG_VERSION = "og:config-version"
CONFIG_CHANNEL = "og:config"
# Set when the database's locks were written into Redis: gone means Redis lost its data
# (restarted without persistence, flushed), and the proxy writes them back.
LOCKS_MIRRORED = "og:locks-mirrored"


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


def identity_counts(user_id: int) -> str:
    """Messages and spam per identity not yet written to the database: a hash of
    ``m:<identity>`` and ``s:<identity>`` counters, emptied by the proxy's flusher."""
    return f"og:{{{user_id}}}:idcounts"


IDENTITY_COUNTS_PATTERN = "og:{*}:idcounts"  # SCAN pattern for counts left by a stopped proxy


def identity_count_field(kind: str, identity: str) -> str:
    """``kind`` is "m" (message) or "s" (spam)."""
    return f"{kind}:{identity.lower()}"


# Failed AUTH throttling. Rare writes and one read per AUTH, all in one hash slot so one
# transaction records a failure for the address and the username together, also on Redis
# Cluster. A subject is "ip:<address>" or "user:<username>".
AUTH_BLOCKS = "og:{auth}:blocks"  # sorted set: subject -> blocked until (epoch seconds)

MAX_AUTH_LOGIN = 320  # longer usernames cannot exist; their subject is cut to this length


def auth_subject_ip(client_ip: str) -> str:
    return f"ip:{client_ip.lower()}"


def auth_subject_user(login: str) -> str:
    return f"user:{login.strip().lower()[:MAX_AUTH_LOGIN]}"


def auth_failures(subject: str) -> str:
    """Sorted set of the subject's recent failed AUTH attempts (member: unique, score: when)."""
    return f"og:{{auth}}:fails:{subject}"


def auth_pending(subject: str) -> str:
    """Sorted set of the subject's AUTH attempts whose password is being checked (member: a
    token per attempt, score: when reserved). They count toward the failure limit until
    decided, so parallel guesses cannot all pass the check before any failure is recorded."""
    return f"og:{{auth}}:pending:{subject}"


def auth_block_info(subject: str) -> str:
    """JSON {since, until, failures} of a block, for the control panel."""
    return f"og:{{auth}}:block:{subject}"


def auth_networks(login: str) -> str:
    """Sorted set of the networks (/24, /64) a username logged in from successfully, scored
    by the last success: its username block does not apply there (``scoring.locks``)."""
    return f"og:{{auth}}:nets:{auth_subject_user(login)}"


# Compromise detection (proxy/detection.lua). Per-user keys share the user's slot; the
# cross-customer campaign count has a slot of its own and only weighs one's own copies.
def detection_state(user_id: int) -> str:
    """Hash of ``<subject>|<field>``: hourly counts, 14-day means, risk, rung, minute count;
    the subject is the identity (lower case) or ``*`` for the user."""
    return f"og:{{{user_id}}}:risk"


def detection_domains(user_id: int, subject: str, hour: int) -> str:
    """HyperLogLog of one hour's distinct recipient domains."""
    return f"og:{{{user_id}}}:dom:{hour}:{subject.lower()}"


def detection_campaign(user_id: int, hour: int, fingerprint: str) -> str:
    """Hash of one hour's own copies of one content: subject -> copies."""
    return f"og:{{{user_id}}}:camp:{hour}:{fingerprint}"


def detection_refusals(user_id: int, hour: int) -> str:
    """Hash of one hour's next-hop answers: subject -> recipients refused for good,
    ``subject|k`` -> recipients answered (taken or refused for good)."""
    return f"og:{{{user_id}}}:ref:{hour}"


def campaign_senders(hour: int, fingerprint: str) -> str:
    """HyperLogLog of the identities (``user:identity``) anywhere sending one content."""
    return f"og:{{camp:{fingerprint}}}:senders:{hour}"


def release_pace(user_id: int, minute: int) -> str:
    """Held messages released in one minute (the worker's pace)."""
    return f"og:{{{user_id}}}:released:{minute}"


def confirmation_mails(domain_id: int, day: str) -> str:
    """How many address confirmations a domain had mailed on ``day`` (YYYYMMDD, UTC)."""
    return f"og:confirm-mails:{domain_id}:{day}"


# The control panel's login form (``webapp/login_throttle.py``): failed logins per client
# address and per admin email, their blocks, and the networks each admin logged in from.
PANEL_LOGIN = "og:{panel-login}"


def panel_login_failures(kind: str, value: str) -> str:
    return f"{PANEL_LOGIN}:fails:{kind}:{value}"


def panel_login_block(kind: str, value: str) -> str:
    return f"{PANEL_LOGIN}:block:{kind}:{value}"


def panel_login_known(email: str, network: str) -> str:
    return f"{PANEL_LOGIN}:known:{email}:{network}"
