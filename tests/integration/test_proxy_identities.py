"""Identities through the real proxy: each identification method, normalised values, counts
written in batches (not per message), and messages without an identity."""

from __future__ import annotations

import logging
import time

import pytest
from sqlalchemy import select

from outgoing import redis_keys
from outgoing.models import IdentificationHeader, Identity
from tests.support import data
from tests.support.mail import GTUBE, client, message, send

PASSWORD = "Alice-pass-123"


def identities(user_id: int) -> dict[str, tuple[int, int]]:
    return data.query(lambda s: {i.value: (i.message_count, i.spam_count) for i in s.scalars(
        select(Identity).where(Identity.user_id == user_id))})


def wait_for_identities(user_id: int, expected: dict, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    found = identities(user_id)
    while found != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        found = identities(user_id)
    return found


@pytest.fixture
def fast_flush(start_proxy):
    def start(**overrides):
        return start_proxy(IDENTITY_FLUSH_SECONDS=0.2, **overrides)
    return start


def test_envelope_senders_become_identities_on_first_sight_counting_messages_and_spam(
        instance, fast_flush, sink):
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    proxy = fast_flush()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        for sender in ("Shop@Example.com", "shop@example.com", "news@example.com"):
            assert send(smtp, message(sender=sender), sender=sender)[0] == 250
        assert send(smtp, message(body=GTUBE), sender="SHOP@example.com")[0] == 550
    assert wait_for_identities(alice, {"shop@example.com": (3, 1),
                                       "news@example.com": (1, 0)}) == {
        "shop@example.com": (3, 1), "news@example.com": (1, 0)}


def test_counts_wait_in_redis_and_reach_the_database_in_one_batch(instance, start_proxy,
                                                                  redis_client, sink):
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    proxy = start_proxy(IDENTITY_FLUSH_SECONDS=3600)
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        for _ in range(5):
            assert send(smtp, message(), sender="alice@example.com")[0] == 250
    assert identities(alice) == {}  # no database write per message
    assert redis_client.hgetall(redis_keys.identity_counts(alice)) == {
        b"m:alice@example.com": b"5"}
    proxy.stop()  # a stopping proxy writes what it holds
    assert identities(alice) == {"alice@example.com": (5, 0)}
    assert not redis_client.exists(redis_keys.identity_counts(alice))


def test_counts_left_in_redis_by_a_stopped_proxy_are_written_by_the_next(
        instance, fast_flush, redis_client):
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    redis_client.hset(redis_keys.identity_counts(alice), "m:left@example.com", 7)
    fast_flush()
    assert wait_for_identities(alice, {"left@example.com": (7, 0)}) == {
        "left@example.com": (7, 0)}


def test_auth_user_method_uses_the_login_name(instance, fast_flush, sink):
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          identification_method="auth_user")
    proxy = fast_flush()
    with client(proxy.port) as smtp:
        smtp.login("Alice@Example.com", PASSWORD)
        assert send(smtp, message(sender="x@elsewhere.example"),
                    sender="x@elsewhere.example")[0] == 250
    assert wait_for_identities(alice, {"alice@example.com": (1, 0)}) == {
        "alice@example.com": (1, 0)}


def test_header_rules_first_match_wins_regex_group_and_header_is_removed(instance,
                                                                         fast_flush, sink):
    headers = [IdentificationHeader(position=0, header_name="X-Customer",
                                    regex=r"cust-(\d+)", remove_header=True),
               IdentificationHeader(position=1, header_name="X-Account", regex=None,
                                    remove_header=False)]
    smarthost = data.add_user("example.com", "ip", "127.0.0.5",
                              identification_method="header",
                              identification_headers=headers)
    proxy = fast_flush()
    with client(proxy.port, source="127.0.0.5") as smtp:
        assert send(smtp, message(X_Customer="Acme cust-42 gold", X_Account="Acct-9"))[0] \
            == 250
        assert send(smtp, message(X_Customer="no number", X_Account="Acct-9"))[0] == 250
    relayed = sink.handler.wait_for(2)
    assert b"X-Customer" not in relayed[0].data and b"X-Account: Acct-9" in relayed[0].data
    assert wait_for_identities(smarthost, {"42": (1, 0), "acct-9": (1, 0)}) == {
        "42": (1, 0), "acct-9": (1, 0)}


def test_a_header_to_remove_cannot_hide_where_the_proxy_would_not_remove_it(
        instance, fast_flush, sink):
    """An indented first line was the X-Secret field to the identity check and a fold of
    our Received: field to the removal, so it was relayed; a field past the thousand the
    check reads was never listed for removal. Both are refused, as is a line without a
    colon (receivers would end the header there); folds are read alike by both, and what
    the check saw is what is removed."""
    user_id = data.add_user("example.com", "ip", "127.0.0.5", identification_method="header",
                            identification_headers=[IdentificationHeader(
                                position=0, header_name="X-Secret", remove_header=True)])
    proxy = fast_flush()
    plain = message()
    many = b"".join(b"X-Junk: %d\r\n" % n for n in range(1000))
    with client(proxy.port, source="127.0.0.5") as smtp:
        for lead in (b" ", b"\t"):
            code, reply = send(smtp, lead + b"X-Secret: customer-4711\r\n" + plain)
            assert (code, reply[:6]) == (550, b"5.6.0 "), reply
            assert b"space or tab" in reply
        code, reply = send(smtp, many + b"X-Secret: customer-4711\r\n" + plain)
        assert (code, reply[:6]) == (550, b"5.6.0 "), reply
        code, reply = send(smtp, b"no colon here\r\n folded\r\nX-Secret: customer-1\r\n"
                           + plain)
        assert (code, reply[:6]) == (550, b"5.6.0 "), reply
        folded = b"X-Secret:\r\n\tcustomer-4711\r\nX-Other: a\r\n folded under it\r\n"
        assert send(smtp, folded + plain)[0] == 250
    relayed = sink.handler.wait_for(1)
    assert len(relayed) == 1
    assert b"X-Secret" not in relayed[0].data and b"customer-4711" not in relayed[0].data
    assert b"\r\nX-Other: a\r\n folded under it\r\n" in relayed[0].data
    assert wait_for_identities(user_id, {"customer-4711": (1, 0)}) == {
        "customer-4711": (1, 0)}


def test_a_locked_header_identity_cannot_pass_under_a_copy_of_the_header(instance,
                                                                         start_proxy, clock,
                                                                         sink):
    """Five spam messages lock the identity "spammer"; the same message with a copy of the
    header naming someone else above it is refused too, naming both, and not relayed."""
    data.add_user("example.com", "ip", "127.0.0.5", identification_method="header",
                  automatic_lock=False, lock_identities_automatically=True,
                  identification_headers=[IdentificationHeader(
                      position=0, header_name="X-Customer", remove_header=True)])
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.5") as smtp:
        for _ in range(5):
            send(smtp, message(body=GTUBE, X_Customer="spammer"))
            clock.advance(30)
        assert send(smtp, message(X_Customer="spammer"))[0] == 550
        code, reply = send(smtp, b"X-Customer: anything-else\r\n" +
                           message(X_Customer="spammer"))
    assert (code, reply) == (550, b"5.7.1 The X-Customer headers of this message name "
                                  b"different senders (anything-else, spammer); send it with one")
    assert sink.handler.messages == []


def test_message_without_an_identity_is_attributed_to_the_user_and_logged(
        instance, fast_flush, sink, caplog):
    smarthost = data.add_user("example.com", "ip", "127.0.0.5",
                              identification_method="header",
                              identification_headers=[IdentificationHeader(
                                  position=0, header_name="X-Customer")])
    proxy = fast_flush()
    with caplog.at_level(logging.INFO, logger="proxy.handler"):
        with client(proxy.port, source="127.0.0.5") as smtp:
            assert send(smtp, message())[0] == 250
    assert len(sink.handler.messages) == 1
    assert any("no identity" in r.getMessage() and "127.0.0.5" in r.getMessage()
               for r in caplog.records)
    time.sleep(0.5)
    assert identities(smarthost) == {}


def test_batches_written_by_two_proxy_instances_add_up(instance):
    from datetime import datetime

    from outgoing.identities import record_counts

    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    now = datetime(2026, 11, 29, 10, 0)
    data.query(lambda s: record_counts(s, alice, {"Shop@Example.com": (3, 1)}, now))
    data.query(lambda s: record_counts(s, alice, {"shop@example.com": (2, 0),
                                                  "new@example.com": (1, 1)}, now))
    assert identities(alice) == {"shop@example.com": (5, 1), "new@example.com": (1, 1)}
