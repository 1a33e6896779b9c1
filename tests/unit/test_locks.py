"""Lock thresholds, timed-unlock decisions and failed-AUTH blocks (pure, clock passed in)."""

import pytest

from proxy.throttle import LocalThrottle, ThrottlePolicy
from scoring.locks import (
    AUTH_BLOCK_SECONDS,
    AUTH_FAILURE_LIMIT,
    auth_block_until,
    auth_blocked,
    auth_client,
    auto_unlock_decision,
    lock_reason,
    should_lock,
)

NOW = 1_800_000_000.0


def test_fifth_spam_in_the_window_locks_and_fourth_does_not():
    assert not should_lock(4, enabled=True)
    assert should_lock(5, enabled=True)
    assert should_lock(6, enabled=True)


def test_automatic_lock_off_never_locks():
    assert not should_lock(100, enabled=False)


def test_threshold_is_configurable():
    assert should_lock(2, enabled=True, threshold=2)
    assert not should_lock(1, enabled=True, threshold=2)


def test_lock_reason_names_count_and_minutes():
    assert lock_reason(5, 600) == "5 spam messages in 10 minutes"
    assert lock_reason(7, 30) == "7 spam messages in 1 minutes"


def test_timed_unlock_lifts_only_the_lock_it_was_scheduled_for():
    assert auto_unlock_decision(locked=True, current_lock_id="b", job_lock_id="a",
                                unlocks_used=0, maximum_unlocks=3).unlock is False
    assert auto_unlock_decision(locked=False, current_lock_id=None, job_lock_id="a",
                                unlocks_used=0, maximum_unlocks=3).unlock is False
    decision = auto_unlock_decision(locked=True, current_lock_id="a", job_lock_id="a",
                                    unlocks_used=2, maximum_unlocks=3)
    assert decision.unlock and decision.note == "automatic unlock 3 of 3"


def test_timed_unlock_stops_once_the_maximum_is_used():
    decision = auto_unlock_decision(locked=True, current_lock_id="a", job_lock_id="a",
                                    unlocks_used=3, maximum_unlocks=3)
    assert not decision.unlock and "administrator" in decision.note


def test_tenth_auth_failure_blocks_for_fifteen_minutes_by_default():
    assert (AUTH_FAILURE_LIMIT, AUTH_BLOCK_SECONDS) == (10, 900)
    assert auth_block_until(9, NOW) is None
    assert auth_block_until(10, NOW) == NOW + 900
    assert auth_block_until(3, NOW, limit=3, block_seconds=60) == NOW + 60


def test_a_limit_of_zero_never_blocks_auth():
    assert auth_block_until(1000, NOW, limit=0) is None


def test_auth_block_ends_exactly_at_its_end():
    until = NOW + 900
    assert auth_blocked(until, NOW)
    assert auth_blocked(until, until - 0.001)
    assert not auth_blocked(until, until)
    assert not auth_blocked(None, NOW)


@pytest.fixture
def local():
    return LocalThrottle(ThrottlePolicy(limit=3, window=600, block_seconds=900),
                         max_subjects=5)


def test_local_throttle_blocks_address_and_username_at_the_limit(local):
    assert local.record_failure("192.0.2.1", "Alice@example.com", NOW) == []
    assert local.record_failure("192.0.2.1", "alice@example.com", NOW + 1) == []
    assert local.record_failure("192.0.2.2", "alice@example.com", NOW + 2) == [
        "user:alice@example.com"]
    assert local.blocked_subject("192.0.2.9", "ALICE@example.com", NOW + 3) == \
        "user:alice@example.com"
    assert local.blocked_subject("192.0.2.1", "bob@example.com", NOW + 3) is None
    assert local.blocked_subject("192.0.2.9", "alice@example.com", NOW + 2 + 900) is None


def test_local_throttle_forgets_failures_outside_the_window(local):
    for offset in (0, 300, 601):
        local.record_failure("192.0.2.1", None, NOW + offset)
    assert local.blocked_subject("192.0.2.1", None, NOW + 602) is None


def test_local_throttle_memory_is_bounded(local):
    for n in range(50):
        local.record_failure(f"192.0.2.{n}", None, NOW)
    assert len(local._failures) <= 5


@pytest.mark.parametrize(("address", "client"), [
    ("192.0.2.77", "192.0.2.77"),  # IPv4: the address itself
    ("::ffff:192.0.2.77", "192.0.2.77"),  # IPv4-mapped: its IPv4 address
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:DB8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # one /64, any host part
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),  # the next /64 is another client
    ("fe80::1%eth0", "fe80::/64"),
    ("unknown", "unknown"),  # not an address: stands for itself
])
def test_auth_failures_count_per_ipv4_address_and_per_ipv6_64(address, client):
    assert auth_client(address) == client
