"""When spam locks a sender, whether a timed unlock may undo a lock, and when failed SMTP
AUTH attempts block a client address or a username for a while."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

SPAM_THRESHOLD = 5
SPAM_WINDOW_SECONDS = 600

# Failed AUTH: this many failures inside the window block the client address (or the
# username) for the block time. Counted per address and per username separately, so one
# attacking address cannot lock a customer out from everywhere, and many addresses guessing
# one password are still stopped.
AUTH_FAILURE_LIMIT = 10
AUTH_FAILURE_WINDOW_SECONDS = 600
AUTH_BLOCK_SECONDS = 900

# A username's block does not apply to networks it logged in from successfully within this
# many days (Dovecot's auth policy, fail2ban's ignore lists): an attacker guessing elsewhere
# cannot lock the owner out of the places they send from. Those networks are still throttled
# per address, and their failures count only toward the address.
AUTH_KNOWN_NETWORK_DAYS = 30
AUTH_KNOWN_NETWORK_PREFIX_V4 = 24
AUTH_KNOWN_NETWORK_PREFIX_V6 = 64


def should_lock(spam_in_window: int, *, enabled: bool, threshold: int = SPAM_THRESHOLD) -> bool:
    """The threshold-th spam inside the window locks, when automatic locking is on."""
    return enabled and spam_in_window >= threshold


def lock_reason(spam_in_window: int, window_seconds: int = SPAM_WINDOW_SECONDS) -> str:
    minutes = max(1, window_seconds // 60)
    return f"{spam_in_window} spam messages in {minutes} minutes"


@dataclass(frozen=True)
class AutoUnlock:
    unlock: bool
    note: str


def auto_unlock_decision(*, locked: bool, current_lock_id: str | None, job_lock_id: str,
                         unlocks_used: int, maximum_unlocks: int) -> AutoUnlock:
    """A timed unlock undoes only the lock it was scheduled for, and only while allowed."""
    if not locked or current_lock_id != job_lock_id:
        return AutoUnlock(False, "lock already lifted or replaced; nothing to do")
    if unlocks_used >= maximum_unlocks:
        return AutoUnlock(False, f"all {maximum_unlocks} automatic unlocks used; "
                                 "an administrator must unlock")
    return AutoUnlock(True, f"automatic unlock {unlocks_used + 1} of {maximum_unlocks}")


def auth_block_until(failures_in_window: int, now: float, *, limit: int = AUTH_FAILURE_LIMIT,
                     block_seconds: float = AUTH_BLOCK_SECONDS) -> float | None:
    """The moment a block ends when this failure reaches the limit, else None. A limit of
    0 or None means AUTH failures are never blocked."""
    if not limit or failures_in_window < limit:
        return None
    return now + block_seconds


def auth_blocked(until: float | None, now: float) -> bool:
    """Is a block that ends at ``until`` still in force at ``now``?"""
    return until is not None and now < until


@lru_cache(maxsize=4096)  # twice per AUTH, 10 µs each; the same clients log in again and again
def auth_network(client_ip: str, *, v4: int = AUTH_KNOWN_NETWORK_PREFIX_V4,
                 v6: int = AUTH_KNOWN_NETWORK_PREFIX_V6) -> str:
    """The network a client address stands for when remembering where a login succeeded:
    its /24 (IPv4) or /64 (IPv6), so a home router's next lease or a phone's next IPv6
    privacy address still counts (other prefixes for other summaries, such as the incident
    pack's /48). An IPv4-mapped IPv6 address is its IPv4 address; anything that is not an
    address stands for itself."""
    try:
        address = ipaddress.ip_address(client_ip.strip().split("%", 1)[0])
    except ValueError:
        return client_ip.strip().lower()
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = v4 if address.version == 4 else v6
    return str(ipaddress.ip_network((address, prefix), strict=False))


AUTH_CLIENT_PREFIX_V6 = 64


@lru_cache(maxsize=4096)  # several times per AUTH; the same clients come back
def auth_client(client_ip: str) -> str:
    """Whom failed AUTH attempts from ``client_ip`` count against: an IPv4 address as it is,
    an IPv6 address as its /64, the smallest network a site is given and one that any host
    in it can fill with addresses of its own, so a guesser rotating through them is one
    client. An IPv4-mapped IPv6 address is its IPv4 address; anything that is not an
    address stands for itself."""
    text = client_ip.strip()
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text.lower()
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if address.version == 4:
        return str(address)
    return str(ipaddress.ip_network((address, AUTH_CLIENT_PREFIX_V6), strict=False))


def auth_known_network(last_success: float | None, now: float, *,
                       days: float = AUTH_KNOWN_NETWORK_DAYS) -> bool:
    """Did the login succeed from this network less than ``days`` before ``now``? Then the
    username's block does not apply there. ``days`` of 0 turns the exemption off."""
    return bool(days) and days > 0 and last_success is not None \
        and now - last_success < days * 86400


def auth_known_network_since(now: float, *, days: float = AUTH_KNOWN_NETWORK_DAYS) -> float:
    """Successes at or before this moment no longer make a network known: forget them."""
    return now - days * 86400
