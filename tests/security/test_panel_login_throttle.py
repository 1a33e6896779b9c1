"""Password guessing on the panel's login form: after AUTH_FAILURE_LIMIT wrong passwords the
guessing address is blocked (even the right password is refused while it lasts), and so is
the guessed admin's email from networks the admin never logged in from; the admin's own
network keeps working. Through the real app, its login form and a real Redis."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from outgoing import redis_keys
from tests.support import data
from tests.support.services import free_port
from tests.support.web import csrf_token
from webapp import login_throttle

EMAIL, PASSWORD = "root@example.net", "Root-pass-12345"
LIMIT = 10  # AUTH_FAILURE_LIMIT's default


@pytest.fixture
def admin(app):
    data.add_admin(EMAIL, PASSWORD)


def client_from(app, address: str):
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def attempt(client, password: str, email: str = EMAIL):
    return client.post("/login", data={"email": email, "password": password,
                                       "csrf_token": csrf_token(client)})


def test_the_guessing_address_is_blocked_even_for_the_right_password(app, admin):
    guesser = client_from(app, "203.0.113.5")
    for n in range(LIMIT):
        assert attempt(guesser, f"guess-{n}").status_code == 400
    refused = attempt(guesser, PASSWORD)
    assert refused.status_code == 429
    assert "Too many failed logins" in refused.get_data(as_text=True)
    assert guesser.get("/outgoing/users").status_code == 302  # still not logged in


def test_guessing_from_many_addresses_blocks_the_email_but_not_the_owners_network(
        app, admin, redis_client):
    owner = client_from(app, "198.51.100.20")
    assert attempt(owner, PASSWORD).status_code == 302
    owner.post("/logout", data={"csrf_token": csrf_token(owner, "/outgoing/users")})
    for n in range(LIMIT):  # one guess per address: no address reaches the limit
        assert attempt(client_from(app, f"203.0.{n}.9"), f"guess-{n}").status_code == 400
    assert redis_client.exists(redis_keys.panel_login_block("email", EMAIL))
    assert attempt(client_from(app, "192.0.2.77"), PASSWORD).status_code == 429
    # The owner's /24 logged in before: the email's block does not apply there.
    assert attempt(client_from(app, "198.51.100.21"), PASSWORD).status_code == 302


def test_guesses_from_many_addresses_of_one_ipv6_64_add_up_to_its_block(
        app, admin, redis_client):
    """A host picks new addresses within its /64 at will: one guess from each still adds
    up to the block of that /64 (other emails: no email block helps here)."""
    for n in range(LIMIT):
        guesser = client_from(app, f"2001:db8:9:9::{n + 1:x}")
        assert attempt(guesser, "guess", email=f"nobody{n}@example.net").status_code == 400
    assert attempt(client_from(app, "2001:db8:9:9:ffff::1"), PASSWORD).status_code == 429
    assert redis_client.exists(redis_keys.panel_login_block("ip", "2001:db8:9:9::/64"))
    assert attempt(client_from(app, "2001:db8:9:a::1"), PASSWORD).status_code == 302


def test_unknown_emails_count_too(app, admin):
    guesser = client_from(app, "203.0.113.6")
    for n in range(LIMIT):
        assert attempt(guesser, "whatever-1", email=f"nobody{n}@example.net").status_code == 400
    assert attempt(guesser, PASSWORD).status_code == 429


def test_a_few_wrong_passwords_do_not_stop_the_right_one(app, admin):
    client = client_from(app, "198.51.100.30")
    for n in range(LIMIT - 1):
        assert attempt(client, f"typo-{n}").status_code == 400
    assert attempt(client, PASSWORD).status_code == 302


def test_clients_behind_a_local_reverse_proxy_are_told_apart(app, admin):
    proxy = client_from(app, "127.0.0.1")
    behind = {"X-Forwarded-For": "198.51.100.99, 203.0.113.50"}  # the proxy appended the last
    for n in range(LIMIT):
        proxy.post("/login", headers=behind, data={
            "email": "other@example.net", "password": f"guess-{n}",
            "csrf_token": csrf_token(proxy)})
    blocked = proxy.post("/login", headers=behind, data={
        "email": EMAIL, "password": PASSWORD, "csrf_token": csrf_token(proxy)})
    assert blocked.status_code == 429
    admin_behind = {"X-Forwarded-For": "192.0.2.10"}
    assert proxy.post("/login", headers=admin_behind, data={
        "email": EMAIL, "password": PASSWORD,
        "csrf_token": csrf_token(proxy)}).status_code == 302


def test_a_remote_client_cannot_choose_its_address_with_the_header(app, admin):
    guesser = client_from(app, "203.0.113.7")
    for n in range(LIMIT):
        guesser.post("/login", headers={"X-Forwarded-For": f"192.0.2.{n}"}, data={
            "email": "other@example.net", "password": f"guess-{n}",
            "csrf_token": csrf_token(guesser)})
    assert guesser.post("/login", headers={"X-Forwarded-For": "192.0.2.200"}, data={
        "email": EMAIL, "password": PASSWORD,
        "csrf_token": csrf_token(guesser)}).status_code == 429


def test_guesses_sent_at_once_are_decided_no_more_than_the_limit(app, admin):
    """Each guess is charged before its password check (which takes a while): twice the
    limit sent at once get at most the limit's worth of checked answers, the rest 429."""
    clients = [client_from(app, "203.0.113.8") for _ in range(2 * LIMIT)]
    tokens = [csrf_token(client) for client in clients]
    start = threading.Barrier(len(clients))

    def guess(n: int) -> int:
        start.wait()
        return clients[n].post("/login", data={"email": EMAIL, "password": f"guess-{n}",
                                               "csrf_token": tokens[n]}).status_code

    with ThreadPoolExecutor(len(clients)) as pool:
        codes = list(pool.map(guess, range(len(clients))))
    assert codes.count(400) <= LIMIT
    assert codes.count(429) >= LIMIT
    assert attempt(clients[0], PASSWORD).status_code == 429


def test_attempts_in_flight_count_toward_the_limit_and_a_success_gives_its_charge_back(
        app, admin, redis_client):
    with app.test_request_context("/login", environ_base={"REMOTE_ADDR": "203.0.113.9"}):
        in_flight = [login_throttle.begin(redis_client, "203.0.113.9", EMAIL)
                     for _ in range(LIMIT)]
        assert all(isinstance(one, login_throttle.Attempt) for one in in_flight)
        for one in in_flight[:3]:
            login_throttle.record_success(redis_client, "203.0.113.9", EMAIL, one)
        # Three given back: three more may go to their password check, then no more.
        assert all(isinstance(login_throttle.begin(redis_client, "203.0.113.9", EMAIL),
                          login_throttle.Attempt) for _ in range(3))
        assert login_throttle.begin(redis_client, "203.0.113.9", EMAIL) > 0
    assert redis_client.exists(redis_keys.panel_login_block("ip", "203.0.113.9"))
    assert redis_client.ttl(redis_keys.panel_login_failures("email", EMAIL)) > 0


def test_with_redis_unreachable_the_form_still_logs_in_and_refuses(app, admin, monkeypatch):
    dead = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    monkeypatch.setitem(app.extensions, "og_redis", dead)
    client = client_from(app, "198.51.100.40")
    assert attempt(client, "wrong-one").status_code == 400
    assert attempt(client, PASSWORD).status_code == 302
