"""Attacks on SMTP AUTH throttling: wrong passwords from elsewhere must not lock a sender out
of the networks they log in from, while password guessing is still stopped.

Real SMTP AUTH (after STARTTLS) against a real proxy with an injected clock. The client binds
to other loopback addresses to play several networks: 127.10.0.x is the owner's home /24,
127.20.0.2 the attacker, 127.30.0.x and up networks the owner never used.
"""

from __future__ import annotations

import asyncio
import base64
import smtplib
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from werkzeug.security import generate_password_hash

from outgoing import redis_keys
from outgoing.models import OutgoingUser
from outgoing.redis_conn import connect_async
from proxy import metrics, throttle
from proxy.throttle import LocalThrottle, ThrottlePolicy
from scoring.locks import auth_known_network, auth_network
from tests.support import data
from tests.support.mail import client
from tests.support.services import RedisServer

PASSWORD = "Alice-pass-123"
LOGIN = "alice@example.com"
HOME, HOME_OTHER_ADDRESS = "127.10.0.2", "127.10.0.77"  # one /24
ATTACKER = "127.20.0.2"
NEW_NETWORK = "127.30.0.2"
DAY = 86400


def plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def auth(port: int, password: str, source: str, login: str = LOGIN) -> int:
    """One AUTH PLAIN attempt on a new connection, from ``source``."""
    with client(port, source=source) as smtp:
        return smtp.docmd("AUTH", f"PLAIN {plain(login, password)}")[0]


def guess(port: int, source: str, times: int = 10) -> None:
    for n in range(times):
        assert auth(port, f"wrong-{n}", source) == 535


@pytest.fixture
def alice(instance):
    return data.add_user("example.com", "user", LOGIN, PASSWORD)


@pytest.fixture
def proxy(alice, start_proxy):
    return start_proxy()  # the defaults: 10 failures in 10 minutes, 15 minutes, 30 days


def test_attacker_elsewhere_blocks_neither_the_owners_known_network_nor_escapes_the_ip_block(
        proxy, clock):
    assert auth(proxy.port, PASSWORD, HOME) == 235
    clock.advance(29 * DAY)
    guess(proxy.port, ATTACKER)  # the 10th blocks the attacker's address and the username
    # The owner, at home (another address of the same /24), still gets in ...
    assert auth(proxy.port, PASSWORD, HOME_OTHER_ADDRESS) == 235
    assert auth(proxy.port, PASSWORD, HOME) == 235
    # ... while the username stays blocked from networks it never logged in from,
    assert auth(proxy.port, PASSWORD, NEW_NETWORK) == 454
    # and the attacker's address is blocked whatever it tries.
    assert auth(proxy.port, PASSWORD, ATTACKER) == 454
    assert auth(proxy.port, "anything", ATTACKER, login="bob@example.com") == 454
    clock.advance(15 * 60)
    assert auth(proxy.port, PASSWORD, NEW_NETWORK) == 235


def test_a_network_last_seen_more_than_30_days_ago_no_longer_counts(proxy, clock):
    assert auth(proxy.port, PASSWORD, HOME) == 235
    clock.advance(30 * DAY + 1)
    guess(proxy.port, ATTACKER)
    assert auth(proxy.port, PASSWORD, HOME) == 454


def test_each_success_renews_its_network(proxy, clock):
    assert auth(proxy.port, PASSWORD, HOME) == 235
    clock.advance(20 * DAY)
    assert auth(proxy.port, PASSWORD, HOME_OTHER_ADDRESS) == 235
    clock.advance(20 * DAY)  # 40 days after the first success, 20 after the last
    guess(proxy.port, ATTACKER)
    assert auth(proxy.port, PASSWORD, HOME) == 235


def test_a_success_from_the_attackers_network_is_not_borrowed_by_other_networks(proxy, clock):
    assert auth(proxy.port, PASSWORD, HOME) == 235
    guess(proxy.port, ATTACKER)
    assert auth(proxy.port, PASSWORD, "127.31.0.5") == 454
    assert auth(proxy.port, PASSWORD, "127.10.1.2") == 454  # the next /24 is another network


def test_failures_from_a_known_network_count_only_toward_the_address(proxy, clock):
    assert auth(proxy.port, PASSWORD, HOME) == 235
    # An old password in the office PC's mail client, retrying: that address is blocked ...
    guess(proxy.port, HOME_OTHER_ADDRESS)
    assert auth(proxy.port, PASSWORD, HOME_OTHER_ADDRESS) == 454
    # ... but the username is not: the owner still gets in from anywhere,
    assert auth(proxy.port, PASSWORD, NEW_NETWORK) == 235
    # and those ten did not count toward the username's limit either.
    guess(proxy.port, ATTACKER, times=9)
    assert auth(proxy.port, PASSWORD, "127.40.0.2") == 235


def test_guessing_from_many_addresses_of_a_new_network_is_still_stopped(proxy, clock):
    assert auth(proxy.port, PASSWORD, HOME) == 235
    for n in range(10):
        assert auth(proxy.port, "wrong", f"127.50.0.{n + 1}") == 535
    assert auth(proxy.port, PASSWORD, "127.50.0.99") == 454
    assert auth(proxy.port, PASSWORD, "127.60.0.1") == 454
    assert auth(proxy.port, PASSWORD, HOME) == 235


def test_known_networks_are_remembered_per_username(alice, start_proxy, clock):
    data.add_user("example.com", "user", "bob@example.com", "Bob-pass-12345")
    proxy = start_proxy()
    assert auth(proxy.port, "Bob-pass-12345", HOME, login="bob@example.com") == 235
    guess(proxy.port, ATTACKER)  # against alice, who never logged in from HOME
    assert auth(proxy.port, PASSWORD, HOME) == 454
    assert auth(proxy.port, "Bob-pass-12345", NEW_NETWORK, login="bob@example.com") == 235


def test_known_networks_of_a_login_are_kept_bounded_and_expire(proxy, clock, redis_client):
    for n in range(40):
        assert auth(proxy.port, PASSWORD, f"127.{100 + n}.0.1") == 235
        clock.advance(1)
    key = redis_keys.auth_networks(LOGIN)
    networks = [m.decode() for m in redis_client.zrange(key, 0, -1)]
    assert 0 < len(networks) <= 32
    assert "127.139.0.0/24" in networks and "127.100.0.0/24" not in networks  # newest kept
    assert 0 < redis_client.ttl(key) <= 31 * DAY
    clock.advance(31 * DAY)
    assert auth(proxy.port, PASSWORD, HOME) == 235
    assert [m.decode() for m in redis_client.zrange(key, 0, -1)] == ["127.10.0.0/24"]


def test_while_redis_is_down_the_owner_is_not_locked_out_of_a_network_this_proxy_saw(
        alice, start_proxy, clock):
    own_redis = RedisServer().start()
    try:
        proxy = start_proxy(REDIS_URL=own_redis.url)
        assert auth(proxy.port, PASSWORD, HOME) == 235
        own_redis.stop()
        guess(proxy.port, ATTACKER)  # counted in the proxy's memory
        assert auth(proxy.port, PASSWORD, ATTACKER) == 454
        assert auth(proxy.port, PASSWORD, NEW_NETWORK) == 454
        assert auth(proxy.port, PASSWORD, HOME_OTHER_ADDRESS) == 235
        # From home, failures count only toward the address there too.
        guess(proxy.port, HOME)
        assert auth(proxy.port, PASSWORD, HOME) == 454
        assert auth(proxy.port, PASSWORD, HOME_OTHER_ADDRESS) == 235
    finally:
        own_redis.stop()


class _Behind(smtplib.SMTP):
    """smtplib from the load balancer's address, sending a PROXY v1 header for ``client``."""

    def __init__(self, port: int, client: str):
        self._header = f"PROXY TCP6 {client} 2001:db8:ffff::25 40000 25\r\n".encode()
        super().__init__("127.0.0.1", port, timeout=15, source_address=(BALANCER, 0))

    def _get_socket(self, host, port, timeout):
        sock = socket.create_connection((host, port), timeout, self.source_address)
        sock.sendall(self._header)
        return sock


BALANCER = "127.0.0.2"


def auth_from_ipv6(port: int, password: str, client: str, login: str = LOGIN) -> int:
    """One AUTH PLAIN after STARTTLS from the IPv6 ``client`` (loopback cannot play one: the
    PROXY protocol names it, as HAProxy does in front of the proxies)."""
    with _Behind(port, client) as smtp:
        smtp.ehlo("client.example.com")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        smtp.starttls(context=context)
        smtp.ehlo("client.example.com")
        return smtp.docmd("AUTH", f"PLAIN {plain(login, password)}")[0]


def test_guesses_from_many_addresses_of_one_ipv6_64_add_up_to_its_block(
        alice, start_proxy, redis_client):
    """Any host can pick new addresses within its /64 at will: each guess from a new one
    counts against the same client, so rotating them buys no more guesses."""
    proxy = start_proxy(SMTP_PROXY_PROTOCOL_FROM=f"{BALANCER}/32", AUTH_FAILURE_LIMIT=3)
    for n in range(3):  # three addresses, one guess each, other logins (no username block)
        assert auth_from_ipv6(proxy.port, "wrong", f"2001:db8:7:7::{n + 1:x}",
                              login=f"nobody{n}@example.com") == 535
    assert auth_from_ipv6(proxy.port, PASSWORD, "2001:db8:7:7:ffff::99") == 454
    assert redis_client.zscore(redis_keys.AUTH_BLOCKS,
                               redis_keys.auth_subject_ip("2001:db8:7:7::/64")) is not None
    # The next /64 is another client, and the owner gets in from there.
    assert auth_from_ipv6(proxy.port, PASSWORD, "2001:db8:7:8::1") == 235


def test_local_throttle_counts_an_ipv6_64_as_one_client():
    now = 1_800_000_000.0
    local = LocalThrottle(ThrottlePolicy(limit=3, window=600, block_seconds=900))
    for n in range(3):
        local.record_failure(f"2001:db8:5:5::{n + 1}", f"nobody{n}@example.com", now)
    assert local.blocked_subject("2001:db8:5:5:abcd::1", LOGIN, now) == \
        "ip:2001:db8:5:5::/64"
    assert local.blocked_subject("2001:db8:5:6::1", LOGIN, now) is None


# -- the policy, for what loopback cannot play (IPv6 networks) -------------------------------

@pytest.mark.parametrize(("address", "network"), [
    ("192.0.2.77", "192.0.2.0/24"),
    ("::ffff:192.0.2.77", "192.0.2.0/24"),  # IPv4-mapped counts as IPv4
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:DB8:1:2:bbbb::2", "2001:db8:1:2::/64"),
])
def test_a_client_network_is_its_24_or_64(address, network):
    assert auth_network(address) == network


def test_known_for_exactly_the_configured_days():
    now = 1_800_000_000.0
    assert auth_known_network(now - 30 * DAY + 1, now, days=30)
    assert not auth_known_network(now - 30 * DAY, now, days=30)
    assert not auth_known_network(None, now, days=30)
    assert not auth_known_network(now, now, days=0)  # 0 turns the exemption off


def test_local_throttle_exempts_ipv6_networks_it_saw_succeed():
    now = 1_800_000_000.0
    local = LocalThrottle(ThrottlePolicy(limit=3, window=600, block_seconds=900))
    local.record_success("2001:db8:1:2::10", LOGIN, now)
    for n in range(3):
        local.record_failure(f"2001:db8:9:9::{n + 1}", LOGIN, now)
    assert local.blocked_subject("2001:db8:1:2:ffff::1", LOGIN, now) is None
    assert local.blocked_subject("2001:db8:1:3::1", LOGIN, now) == f"user:{LOGIN}"
    assert local.check("2001:db8:1:2::10", LOGIN, now + 30 * DAY - 1).known_network
    assert not local.check("2001:db8:1:2::10", LOGIN, now + 30 * DAY).known_network


def test_a_block_made_while_scrypt_runs_refuses_the_next_auth_not_the_one_checked(
        redis_url, redis_client):
    """The check before scrypt let the login through; a block that lands while scrypt runs
    (parallel guessing from the same address) applies from the next AUTH. The success is
    still recorded, with the failures before it that compromise detection scores. A login
    whose password was known without scrypt is checked and recorded in one call, and that
    call records nothing when it finds the block."""
    policy = ThrottlePolicy(limit=3)
    now = 1_800_000_000.0
    address = "192.0.2.1"

    async def scenario():
        redis = connect_async(redis_url)
        try:
            await throttle.record_failure(redis, address, LOGIN, now, policy)
            await throttle.record_failure(redis, address, "bob@example.com", now, policy)
            before = await throttle.check(redis, address, LOGIN, now, policy)
            await throttle.record_failure(redis, address, "carol@example.com", now, policy)
            known = await throttle.check(redis, address, LOGIN, now, policy, success=True,
                                         ask_failures=True)
            remembered_by_known = redis_client.zscore(redis_keys.auth_networks(LOGIN),
                                                      auth_network(address))
            after_scrypt = await throttle.check(redis, address, LOGIN, now, policy,
                                                success=True, checked=True, ask_failures=True)
            return before, known, remembered_by_known, after_scrypt
        finally:
            await redis.aclose()

    before, known, remembered_by_known, after_scrypt = asyncio.run(scenario())
    assert before.blocked is None
    assert known.blocked == "ip:192.0.2.1" and not known.succeeded
    assert remembered_by_known is None
    assert after_scrypt.succeeded and after_scrypt.failed_before  # alice's own failure
    assert redis_client.zscore(redis_keys.auth_networks(LOGIN), auth_network(address)) == now


def slow_hash(user_id: int, password: str = PASSWORD) -> None:
    """About 0.7 s of scrypt on this kind of machine: AUTHs sent together overlap in it."""
    data.query(lambda session: setattr(session.get(OutgoingUser, user_id), "password_hash",
                                       generate_password_hash(password, "scrypt:32768:8:8")))


def test_the_proxy_lets_a_login_it_checked_finish_when_a_block_lands_during_scrypt(
        alice, start_proxy, redis_client, redis_url, clock):
    """The same through the proxy: a slow password hash, and a block of the address made
    while it is verified. Guessing through this proxy cannot make one then (the attempt
    being checked holds one of the limit's slots), so it comes from another proxy process
    whose limit is lower, as while a configuration change rolls out."""
    slow_hash(alice)
    proxy = start_proxy(AUTH_FAILURE_LIMIT=3)

    async def block_elsewhere():
        redis = connect_async(redis_url)
        try:
            return await throttle.record_failure(redis, ATTACKER, "bob@example.com", clock(),
                                                 ThrottlePolicy(limit=1))
        finally:
            await redis.aclose()

    with ThreadPoolExecutor(1) as pool:
        login = pool.submit(auth, proxy.port, PASSWORD, ATTACKER)
        # Checked, so in scrypt (about 0.7 s on this kind of machine): the check holds its
        # slot until then. (A fixed sleep was too short on a loaded machine.)
        pending = redis_keys.auth_pending(redis_keys.auth_subject_ip(ATTACKER))
        deadline = time.monotonic() + 30
        while not redis_client.zcard(pending) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert asyncio.run(block_elsewhere()) == [f"ip:{ATTACKER}", "user:bob@example.com"]
        assert not login.done(), "scrypt ended before the block: the test proves nothing"
        assert login.result() == 235
    assert redis_client.zscore(redis_keys.auth_networks(LOGIN), auth_network(ATTACKER))
    assert auth(proxy.port, PASSWORD, ATTACKER) == 454  # from the next AUTH on


def at_once(port: int, attempts: list[tuple[str, str]], source: str) -> list:
    """AUTH PLAIN attempts on connections opened first, sent together (a barrier), so every
    one reaches the throttle's check before any password is verified. Futures of the
    codes, in order."""
    connections = [client(port, source=source) for _ in attempts]
    barrier = threading.Barrier(len(attempts))

    def one(smtp, login: str, password: str) -> int:
        with smtp:
            barrier.wait()
            return smtp.docmd("AUTH", f"PLAIN {plain(login, password)}")[0]

    pool = ThreadPoolExecutor(len(attempts))
    futures = [pool.submit(one, smtp, *attempt)
               for smtp, attempt in zip(connections, attempts, strict=True)]
    pool.shutdown(wait=False)
    return futures


@pytest.mark.parametrize("redis_down", [False, True], ids=["redis", "redis down"])
def test_parallel_guesses_cannot_outrun_the_failure_limit(redis_down, alice, start_proxy,
                                                          redis_url):
    """Reported: nine wrong passwords one by one, then twenty AUTHs at once (nineteen wrong,
    one right) all answered 535 and 235. The check before scrypt saw no block, and the
    failures were recorded only after it. Each attempt being checked now holds one of the
    limit's slots: with a limit of 3 and one failure recorded, at most two of the guesses
    sent together are decided, the others get 454, and so does the right password sent
    while they are checked. The same in the proxy's memory while Redis is down."""
    slow_hash(alice)
    own_redis = RedisServer().start() if redis_down else None
    try:
        proxy = start_proxy(AUTH_FAILURE_LIMIT=3,
                            **({"REDIS_URL": own_redis.url} if own_redis else {}))
        if own_redis:
            own_redis.stop()
        assert auth(proxy.port, "wrong-first", ATTACKER) == 535
        wrong = at_once(proxy.port, [(LOGIN, f"wrong-{n}") for n in range(6)], ATTACKER)
        time.sleep(0.2)  # the guesses are checked, and in scrypt
        assert not all(f.done() for f in wrong), \
            "every guess was decided before the right password came: the test proves nothing"
        right = auth(proxy.port, PASSWORD, ATTACKER)
        codes = [f.result() for f in wrong]
        assert codes.count(535) <= 2, codes
        assert sorted(set(codes)) <= [454, 535], codes
        assert right == 454
        assert auth(proxy.port, PASSWORD, ATTACKER) == 454  # the limit's failures: a block
    finally:
        if own_redis:
            own_redis.stop()


def test_a_fleet_logging_in_at_once_shares_one_slot_and_gets_in(alice, start_proxy):
    """Connections opening together with the same password wait for one verification, and
    hold one slot toward the limit between them: more of them than the limit all get in."""
    slow_hash(alice)
    proxy = start_proxy(AUTH_FAILURE_LIMIT=3)
    fleet = at_once(proxy.port, [(LOGIN, PASSWORD)] * 6, NEW_NETWORK)
    assert [f.result() for f in fleet] == [235] * 6


def test_simultaneous_wrong_passwords_cost_one_check_whether_the_login_exists_or_not(
        alice, start_proxy):
    """Simultaneous AUTHs of one login with one password share one verification; a login
    that does not exist used to run its stand-in scrypt once per attempt, so five at once
    answered together for a real login and one after another for an unknown one: the
    replies' timing told which logins (other customers' too) exist. Counted, not timed: the
    verifications each case ran."""
    proxy = start_proxy()

    def checks_for(login: str, source: str) -> float:
        before = metrics.PASSWORD_CHECKS._value.get()
        codes = [f.result() for f in at_once(proxy.port, [(login, "wrong-Pass-1")] * 5,
                                              source)]
        assert codes == [535] * 5
        return metrics.PASSWORD_CHECKS._value.get() - before

    existing = checks_for(LOGIN, "127.70.0.1")
    unknown = checks_for("nobody@example.com", "127.70.0.2")
    assert (existing, unknown) == (1, 1)
    # The login as the directory looks it up: case and spaces make no other login.
    assert checks_for(" Nobody@Example.COM", "127.70.0.3") == 1


@pytest.mark.parametrize("configured,days", [(float("nan"), 0.0), (-1, 0.0), (0, 0.0),
                                             (float("inf"), 3650.0), (45, 45.0)])
def test_known_network_days_from_an_instance_file_are_a_usable_number(configured, days):
    policy = ThrottlePolicy.from_config({"AUTH_KNOWN_NETWORK_DAYS": configured})
    assert policy.known_network_days == days
    assert isinstance(policy.known_network_seconds, int)


@pytest.mark.parametrize("login,password", [
    (LOGIN.encode(), b"\xff\xfe not utf-8"),
    (b"nobody\xff@example.com", b"whatever-1"),
    (LOGIN.encode(), b"wrong\x01\x1b\x7f\r\n"),  # a NUL would split the PLAIN data
    (b"x" * 240 + b"@example.com", b"p" * 100),  # longest that fits the 512-byte command
], ids=["8-bit password", "8-bit login", "control characters", "long login and password"])
def test_hostile_auth_attempts_count_toward_the_limit_and_hold_no_slot_after(
        login, password, alice, start_proxy, redis_client):
    """Whatever the bytes, each wrong attempt is answered 535 until the limit, then 454, and
    no attempt's slot is left held once its check is over (a leaked slot would count as a
    failure for the whole window)."""
    proxy = start_proxy(AUTH_FAILURE_LIMIT=3)
    blob = base64.b64encode(b"\0" + login + b"\0" + password).decode()
    codes = []
    for _ in range(4):
        with client(proxy.port, source=ATTACKER) as smtp:
            codes.append(smtp.docmd("AUTH", f"PLAIN {blob}")[0])
    assert codes == [535, 535, 535, 454]
    pending = list(redis_client.scan_iter(match="og:{auth}:pending:*"))
    assert all(redis_client.zcard(key) == 0 for key in pending), pending
