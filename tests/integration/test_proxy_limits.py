"""Connection and recipient limits through the real proxy, with the clock injected: each
window, counting once per SMTP connection when it opens (at connect for IP users, at AUTH for
logins; for users without connection limits with the first MAIL, or as a connection without
one ends), recipients over a rolling day, "no limit" values, and two proxy instances sharing
one Redis."""

from __future__ import annotations

import smtplib
import socket
import ssl

import pytest

from outgoing.usage import read_usage_sync
from scoring.limits import CONNECTION_WINDOWS, MONTH
from tests.support import data
from tests.support.mail import client, message, send
from tests.support.redis_monitor import ScriptsRun

PASSWORD = "Alice-pass-123"
T0 = 700 * MONTH  # starts a bucket of every window, so estimates are exact


@pytest.fixture
def at_t0(clock):
    clock.now = T0
    return clock


def session(port: int, *, messages: int = 1, rcpts=("bob@example.org",)) -> int:
    """One SMTP session as alice; the reply code of the first refused step, or 250."""
    with client(port) as smtp:
        try:
            smtp.login("alice@example.com", PASSWORD)
        except smtplib.SMTPAuthenticationError as refused:
            return refused.smtp_code
        for _ in range(messages):
            code, _ = send(smtp, message(), rcpts=rcpts)
            if code != 250:
                return code
    return 250


def usage(redis_client, user_id: int, now: float, window: str) -> tuple[int, int]:
    return read_usage_sync(redis_client, user_id, now)[window]


@pytest.mark.parametrize("window", list(CONNECTION_WINDOWS))
def test_each_connection_window_refuses_the_fourth_session_at_a_limit_of_three(
        window, instance, start_proxy, at_t0, redis_client, sink):
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          connection_limits_enabled=True, **{f"limit_per_{window}": 3})
    proxy = start_proxy()
    for _ in range(3):
        assert session(proxy.port, messages=2) == 250  # two messages, one session counted
    with client(proxy.port) as smtp:
        code, reply = smtp.docmd("AUTH", "PLAIN " + _plain("alice@example.com", PASSWORD))
    assert code == 454  # refused when the connection would open, at AUTH
    assert reply.decode() == (f"4.7.0 Outgoing connection limit per {window} (3) reached, "
                              "try again later")
    assert usage(redis_client, alice, at_t0(), window) == (0, 3)  # the refusal is not counted
    at_t0.advance(2 * CONNECTION_WINDOWS[window])
    assert session(proxy.port) == 250
    assert len(sink.handler.messages) == 7


def test_a_limited_session_may_send_many_messages(instance, start_proxy, at_t0, redis_client,
                                                  sink):
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          connection_limits_enabled=True, limit_per_minute=1)
    proxy = start_proxy()
    assert session(proxy.port, messages=5) == 250
    assert session(proxy.port) == 454
    assert usage(redis_client, alice, at_t0(), "minute") == (0, 1)


def test_limits_are_not_enforced_while_connection_limits_are_disabled(
        instance, start_proxy, at_t0, redis_client, sink):
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          connection_limits_enabled=False, limit_per_minute=1)
    proxy = start_proxy()
    for _ in range(3):
        assert session(proxy.port) == 250
    assert usage(redis_client, alice, at_t0(), "minute") == (0, 3)  # still counted


def test_zero_or_empty_limits_mean_no_limit(instance, start_proxy, at_t0, sink):
    data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                  connection_limits_enabled=True, limit_per_minute=0, limit_per_hour=None,
                  maximum_recipients_per_day=0)
    proxy = start_proxy()
    for _ in range(3):
        assert session(proxy.port, rcpts=("a@example.org", "b@example.org")) == 250


def test_ip_users_connection_limit_counts_each_session_once(instance, start_proxy, at_t0,
                                                            sink):
    data.add_user("example.com", "ip", "127.0.0.5", connection_limits_enabled=True,
                  limit_per_hour=2)
    proxy = start_proxy()
    for _ in range(2):
        with client(proxy.port, source="127.0.0.5") as smtp:
            assert send(smtp, message())[0] == 250
            assert send(smtp, message())[0] == 250
    assert greeting(proxy.port, "127.0.0.5") == (
        b"421 4.7.0 Outgoing connection limit per hour (2) reached, try again later\r\n")


def starttls(smtp: smtplib.SMTP) -> None:
    """STARTTLS on a session that began without it, and EHLO again."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    smtp.starttls(context=context)
    smtp.ehlo("client.example.com")


def greeting(port: int, source: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), source_address=(source, 0),
                                  timeout=10) as sock:
        return sock.recv(1000)


def _plain(login: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def test_connections_that_never_send_count_too(instance, start_proxy, at_t0, redis_client,
                                               sink):
    ip_user = data.add_user("example.com", "ip", "127.0.0.5", connection_limits_enabled=True,
                            limit_per_hour=2)
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          connection_limits_enabled=True, limit_per_hour=1)
    proxy = start_proxy()
    for _ in range(2):  # open, greeting, close: nothing sent
        assert greeting(proxy.port, "127.0.0.5").startswith(b"220 ")
    assert greeting(proxy.port, "127.0.0.5").startswith(b"421 4.7.0 ")
    assert usage(redis_client, ip_user, at_t0(), "hour") == (0, 2)
    with client(proxy.port) as smtp:  # a login: counted at AUTH, even if it never sends
        smtp.login("alice@example.com", PASSWORD)
    assert session(proxy.port) == 454
    assert usage(redis_client, alice, at_t0(), "hour") == (0, 1)
    # Another address, in no range, is not anyone's connection.
    assert greeting(proxy.port, "127.0.0.9").startswith(b"220 ")


def test_recipients_per_rolling_day_refuse_with_452_and_free_up_later(
        instance, start_proxy, at_t0, redis_client, sink):
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          maximum_recipients_per_day=3)
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert send(smtp, message(), rcpts=("a@example.org", "b@example.org"))[0] == 250
        assert smtp.mail("alice@example.com")[0] == 250
        assert smtp.rcpt("c@example.org")[0] == 250
        code, reply = smtp.rcpt("d@example.org")
        assert code == 452
        assert reply.decode() == ("4.5.3 Maximum number of recipients per day (3) reached, "
                                  "try again later")
        assert smtp.data(message())[0] == 250  # the accepted recipient still gets it
    assert usage(redis_client, alice, at_t0(), "recipients") == (0, 3)
    at_t0.advance(36 * 3600)  # yesterday's 3 weigh half now: 1.5 + 1 fits, once
    assert session(proxy.port) == 250
    assert session(proxy.port) == 452
    at_t0.advance(48 * 3600)
    assert session(proxy.port, rcpts=("a@example.org", "b@example.org", "c@example.org")) == 250
    assert [len(m.rcpt_tos) for m in sink.handler.messages] == [2, 1, 1, 3]


def test_a_transaction_abandoned_before_rcpt_counts_no_recipient(instance, start_proxy,
                                                                 at_t0, redis_client, sink):
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          maximum_recipients_per_day=1)
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert smtp.mail("alice@example.com")[0] == 250
        smtp.rset()
        assert smtp.mail("alice@example.com")[0] == 250
        smtp.rset()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert smtp.mail("alice@example.com")[0] == 250
    # ... and the connection ended there.
    assert session(proxy.port) == 250
    assert usage(redis_client, alice, at_t0(), "recipients") == (0, 1)
    assert session(proxy.port) == 452


def test_two_proxy_instances_sharing_one_redis_enforce_one_limit(instance, start_proxy,
                                                                 at_t0, sink):
    data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                  connection_limits_enabled=True, limit_per_hour=3,
                  maximum_recipients_per_day=5)
    first = start_proxy()
    second = start_proxy(SMTP_LISTEN="127.0.0.1:0")
    assert [session(p.port) for p in (first, second, first)] == [250, 250, 250]
    assert session(second.port) == 454
    assert session(first.port) == 454
    at_t0.advance(2 * 3600)
    # 3 recipients counted by either instance; 2 more fit, the third does not...
    assert session(second.port, rcpts=("a@example.org", "b@example.org", "c@example.org")) \
        == 452
    # ... and the two accepted ones count, on the other instance too.
    assert session(first.port) == 452
    assert len(sink.handler.messages) == 3


def test_a_recipient_reserved_before_starttls_is_given_back_after_it(instance, start_proxy,
                                                                     at_t0, redis_client,
                                                                     sink):
    ip_user = data.add_user("example.com", "ip", "127.0.0.5", maximum_recipients_per_day=1)
    proxy = start_proxy()
    with client(proxy.port, starttls=False, source="127.0.0.5") as smtp:
        assert smtp.mail("alice@example.com")[0] == 250  # reserves the only recipient
        starttls(smtp)
        assert send(smtp, message())[0] == 250
    assert usage(redis_client, ip_user, at_t0(), "recipients") == (0, 1)


def eventually_counted(redis_client, user_id: int, now: float, expected: int) -> int:
    """The hour's count once it reaches ``expected`` and a moment more has passed (so that
    a count too many shows), or what it is after 10 s: a connection that ends without MAIL
    is counted as it closes, after the client has gone."""
    import time

    deadline = time.monotonic() + 10
    while True:
        count = usage(redis_client, user_id, now, "hour")[1]
        if count >= expected or time.monotonic() > deadline:
            time.sleep(0.2)  # and nothing more comes
            return usage(redis_client, user_id, now, "hour")[1]
        time.sleep(0.02)


def test_connections_of_users_without_limits_count_once_with_or_without_mail(
        instance, start_proxy, at_t0, redis_client, sink):
    """With no connection limit nothing can refuse a connection, so it is counted with the
    first MAIL's round trip or, without one, as it ends: the same count, once per
    connection, STARTTLS or not, for an IP user and a login."""
    ip_user = data.add_user("example.com", "ip", "127.0.0.5")
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    proxy = start_proxy()
    assert greeting(proxy.port, "127.0.0.5").startswith(b"220 ")  # nothing sent
    with client(proxy.port, source="127.0.0.5") as smtp:  # STARTTLS, no MAIL
        smtp.noop()
    with client(proxy.port, source="127.0.0.5") as smtp:  # STARTTLS, two messages
        assert send(smtp, message())[0] == 250
        assert send(smtp, message())[0] == 250
    with client(proxy.port, starttls=False, source="127.0.0.5") as smtp:  # MAIL, then TLS
        assert smtp.mail("alice@example.com")[0] == 250
        smtp.rset()
        starttls(smtp)
        assert send(smtp, message())[0] == 250
    assert eventually_counted(redis_client, ip_user, at_t0(), 4) == 4
    with client(proxy.port) as smtp:  # a login that never sends
        smtp.login("alice@example.com", PASSWORD)
    assert session(proxy.port, messages=2) == 250
    assert eventually_counted(redis_client, alice, at_t0(), 2) == 2


def test_a_user_without_connection_limits_costs_one_round_trip_less_a_connection(
        instance, start_proxy, at_t0, redis_client, sink):
    """A one-message connection of an IP user without connection limits: its count rides
    on MAIL's script, where a user with limits has it checked at connect first."""
    limited = data.add_user("example.com", "ip", "127.0.0.5", connection_limits_enabled=True,
                            limit_per_hour=100)
    free = data.add_user("example.com", "ip", "127.0.0.6")
    proxy = start_proxy()
    calls = {}
    for user_id, source in ((limited, "127.0.0.5"), (free, "127.0.0.6")):
        with client(proxy.port, starttls=False, source=source) as smtp:
            assert send(smtp, message())[0] == 250  # warms every script up
        assert eventually_counted(redis_client, user_id, at_t0(), 1) == 1
        with ScriptsRun(redis_client) as scripts:
            with client(proxy.port, starttls=False, source=source) as smtp:
                assert send(smtp, message())[0] == 250
            assert eventually_counted(redis_client, user_id, at_t0(), 2) == 2
        calls[source] = scripts.count
    assert calls["127.0.0.6"] == calls["127.0.0.5"] - 1


def test_a_client_leaving_during_mail_is_counted_once(instance, start_proxy, at_t0,
                                                      redis_client, sink):
    """MAIL, then the connection closes at once: the session ends while MAIL's script runs
    or just after it, and the connection it counted is not counted again at the close."""
    ip_user = data.add_user("example.com", "ip", "127.0.0.5")
    proxy = start_proxy()
    rounds = 12
    for _ in range(rounds):
        with socket.create_connection(("127.0.0.1", proxy.port), source_address=("127.0.0.5", 0),
                                      timeout=10) as sock:
            assert sock.recv(1000).startswith(b"220 ")
            sock.sendall(b"EHLO client.example.com\r\n")
            while not sock.recv(1000).rstrip().split(b"\r\n")[-1].startswith(b"250 "):
                pass
            sock.sendall(b"MAIL FROM:<alice@example.com>\r\n")
            sock.shutdown(socket.SHUT_WR)  # gone before the reply
    assert eventually_counted(redis_client, ip_user, at_t0(), rounds) == rounds


@pytest.mark.parametrize("starttls", [False, True], ids=["plain", "after STARTTLS"])
def test_connections_open_at_shutdown_are_counted(starttls, instance, start_proxy, at_t0,
                                                 redis_client, sink):
    """A restart ends connections that have sent no MAIL yet: each is counted as the proxy
    stops, once (also when STARTTLS moved what it owed to a new session)."""
    ip_user = data.add_user("example.com", "ip", "127.0.0.5")
    proxy = start_proxy()
    clients = [client(proxy.port, starttls=starttls, source="127.0.0.5") for _ in range(3)]
    proxy.stop()
    for smtp in clients:
        smtp.close()
    assert eventually_counted(redis_client, ip_user, at_t0(), 3) == 3


def test_a_locked_user_without_limits_still_counts_the_connection(instance, start_proxy, at_t0,
                                                                  redis_client, sink):
    """MAIL's script refuses a locked user before counting anything: the connection it was
    to count is counted when it ends, once."""
    from outgoing import locks
    from outgoing.locks import LOCK_AUTOMATIC
    from outgoing.models import OutgoingUser

    ip_user = data.add_user("example.com", "ip", "127.0.0.5")
    data.query(lambda session: locks.lock(session, redis_client,
                                          session.get(OutgoingUser, ip_user),
                                          kind=LOCK_AUTOMATIC, reason="test", actor="test"))
    proxy = start_proxy()
    with client(proxy.port, starttls=False, source="127.0.0.5") as smtp:
        assert smtp.mail("alice@example.com")[0] == 550
        assert smtp.mail("alice@example.com")[0] == 550
    assert eventually_counted(redis_client, ip_user, at_t0(), 1) == 1
