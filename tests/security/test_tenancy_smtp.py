"""Attacks by one customer on another through the SMTP side, against a real proxy server:
re-authentication across domains, ranges added through the panel, and an open-relay range
that was stored before the rules existed (DESIGN.md "Tenancy", "Re-authenticate")."""

from __future__ import annotations

import pytest

from outgoing import locks
from outgoing.models import KIND_IP, LOCK_MANUAL, OutgoingUser
from tests.integration.test_panel_users import Panel
from tests.integration.test_proxy_auth import PASSWORD, sessions_of, sessions_once_closed
from tests.support import data
from tests.support.mail import client, message, send

OPS, OPS_PW = "ops@one.example", "Ops-pass-12345"


def lock_user(redis_client, user_id: int) -> None:
    data.query(lambda s: locks.lock(s, redis_client, s.get(OutgoingUser, user_id),
                                    kind=LOCK_MANUAL, reason="compromised", actor="test",
                                    claim_in_redis=False))


@pytest.mark.parametrize("reauthenticate_as", ["domain", "user"])
def test_an_ip_user_cannot_count_against_another_customer(
        instance, start_proxy, clock, redis_client, sink, reauthenticate_as):
    ip_user = data.add_user("one.example", "ip", "127.0.0.5",
                            reauthenticate_as=reauthenticate_as)
    victim_domain = data.add_user("two.example", "domain", "two.example", PASSWORD,
                                  reauthenticate_permitted=True, connection_limits_enabled=True,
                                  limit_per_day=1)
    victim_user = data.add_user("two.example", "user", "x@two.example", PASSWORD,
                                reauthenticate_permitted=True)
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.5") as smtp:
        for _ in range(3):
            assert send(smtp, message(sender="x@two.example"), sender="x@two.example")[0] == 250
    # All of it counted against the sender's own IP user, nothing against two.example.
    assert sessions_of(redis_client, ip_user, clock()) == 1
    assert sessions_of(redis_client, victim_domain, clock()) == 0
    assert sessions_of(redis_client, victim_user, clock()) == 0
    assert len(sink.handler.messages) == 3


def test_another_customers_lock_neither_applies_nor_can_be_triggered(
        instance, start_proxy, redis_client, sink):
    data.add_user("one.example", "ip", "127.0.0.5", reauthenticate_as="domain")
    victim = data.add_user("two.example", "domain", "two.example", PASSWORD,
                           reauthenticate_permitted=True)
    lock_user(redis_client, victim)
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.5") as smtp:
        # two.example's lock is two.example's business: one.example's mail is its own.
        assert smtp.mail("x@two.example")[0] == 250


def test_reauthentication_inside_ones_own_domain_still_works(
        instance, start_proxy, clock, redis_client, sink):
    ip_user = data.add_user("one.example", "ip", "127.0.0.5", reauthenticate_as="domain")
    own = data.add_user("one.example", "domain", "one.example", PASSWORD,
                        reauthenticate_permitted=True)
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.5") as smtp:
        assert send(smtp, message(), sender="news@one.example")[0] == 250
    assert sessions_of(redis_client, own, clock()) == 1
    # The connection it opened, counted as it closed (no MAIL of the IP user counted it).
    assert sessions_once_closed(redis_client, ip_user, clock()) == 1


def test_a_shared_smarthost_reattributes_across_domains_and_obeys_the_targets_lock(
        instance, start_proxy, clock, redis_client, sink):
    data.add_user("provider.example", "ip", "127.0.0.5", reauthenticate_as="domain",
                  shared_smarthost=True)
    target = data.add_user("two.example", "domain", "two.example", PASSWORD,
                           reauthenticate_permitted=True)
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.5") as smtp:
        assert send(smtp, message(), sender="x@two.example")[0] == 250
    assert sessions_of(redis_client, target, clock()) == 1
    lock_user(redis_client, target)
    with client(proxy.port, source="127.0.0.5") as smtp:
        assert smtp.mail("x@two.example")[0] == 550


def test_ranges_added_by_a_domain_admin_nest_and_the_most_specific_wins(
        app, instance, start_proxy, clock, redis_client, sink):
    data.add_user("two.example", "ip", "127.0.1.0/24")
    data.add_admin(OPS, OPS_PW, domain="one.example")
    ops = Panel(app.test_client()).login(OPS, OPS_PW)
    assert ops.add("ip", "one.example", ip_range="127.0.0.0/24", action="add").status_code == 302
    assert ops.add("ip", "one.example", ip_range="127.0.0.7", action="add").status_code == 302
    # Another customer's host: refused, so its mail stays under two.example.
    assert ops.add("ip", "one.example", ip_range="127.0.1.9", action="add").status_code == 400

    def user_id(name):
        return data.query(lambda s: s.query(OutgoingUser).filter_by(name=name).one().id)

    network, host, theirs = user_id("127.0.0.0/24"), user_id("127.0.0.7"), user_id(
        "127.0.1.0/24")
    proxy = start_proxy()
    for source in ("127.0.0.7", "127.0.0.8", "127.0.1.9"):
        with client(proxy.port, source=source) as smtp:
            assert send(smtp, message())[0] == 250
    assert [sessions_of(redis_client, u, clock()) for u in (host, network, theirs)] == [1, 1, 1]


def test_a_whole_space_range_stored_before_the_rule_relays_nothing(
        instance, start_proxy, sink):
    def store(session):
        from outgoing.users import get_or_create_domain

        domain = get_or_create_domain(session, "one.example")
        session.add(OutgoingUser(domain=domain, kind=KIND_IP, name="0.0.0.0/0", ip_family=4,
                                 ip_first=f"{0:032x}", ip_last=f"{2**32 - 1:032x}"))
    data.query(store)
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.9") as smtp:
        assert smtp.mail("x@one.example")[0] == 530
    assert sink.handler.messages == []
