"""Compromise detection through the real proxy, Redis and sink: each rung, shadow mode, the
authentication and refusal signals, and the cross-customer rule."""

from __future__ import annotations

import json
import smtplib

import pytest
from sqlalchemy import select

from outgoing.models import AuditEvent, HeldMessage, Identity
from tests.support import data
from tests.support.mail import client, message, send

PW = "Alice-pass-123"
ENFORCE = dict(compromise_detection=True, detection_shadow_mode=False,
               detection_throttle_at=0, detection_hold_at=40, detection_lock_at=0,
               detection_throttle_rate=1000, detection_new_sender_allowance=2,
               detection_release_pace=30)


def spam_like(i: int, sender="alice@example.com") -> tuple[bytes, str]:
    rcpt = f"user{i}@dest{i}.example"
    body = ("Your mailbox quota is full. Verify your account now at the secure portal "
            f"or lose access to your messages today. Ref {i}\n")
    return message(sender=sender, to=rcpt, subject="Mailbox verification", body=body), rcpt


def blast(smtp, count: int, sender="alice@example.com", start=0) -> list[int]:
    codes = []
    for i in range(start, start + count):
        msg, rcpt = spam_like(i, sender)
        codes.append(send(smtp, msg, sender=sender, rcpts=[rcpt])[0])
    return codes


def audit_actions() -> list[str]:
    return data.query(lambda s: [e.action for e in s.scalars(
        select(AuditEvent).where(AuditEvent.action.like("detection_%")).order_by(AuditEvent.id))])


def held_rows() -> list[tuple[str, str]]:
    return data.query(lambda s: [(r.identity, r.state) for r in s.scalars(select(HeldMessage))])


def test_burst_is_held_stored_and_not_relayed(instance, start_proxy, sink):
    data.add_user("example.com", "user", "alice@example.com", PW, **ENFORCE)
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PW)
        codes = blast(smtp, 30)
    assert set(codes) == {250}  # held mail is accepted: the sender's server keeps quiet
    held = held_rows()
    assert held and all(state == "held" for _, state in held)
    assert len(sink.handler.messages) == 30 - len(held)
    assert "detection_hold" in audit_actions()
    signals = data.query(lambda s: json.loads(s.scalars(select(HeldMessage)).first().signals))
    assert "volume" in signals or "spread" in signals


def test_throttle_answers_451_over_the_rate_and_recovers_next_minute(
        instance, start_proxy, sink, clock):
    data.add_user("example.com", "user", "alice@example.com", PW,
                  **dict(ENFORCE, detection_throttle_at=20, detection_hold_at=0,
                         detection_throttle_rate=3))
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PW)
        codes = blast(smtp, 40)
        assert 451 in codes
        first = codes.index(451)
        msg, rcpt = spam_like(99)
        assert send(smtp, msg, rcpts=[rcpt])[0] == 451
        clock.advance(61)
        assert send(smtp, msg, rcpts=[rcpt])[0] == 250
    assert first > 5
    assert "detection_throttle" in audit_actions()


def test_lock_rung_locks_the_identity_with_the_signals_as_reason(instance, start_proxy, sink):
    user = data.add_user("example.com", "user", "alice@example.com", PW,
                         **dict(ENFORCE, detection_hold_at=0, detection_lock_at=40))
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PW)
        codes = blast(smtp, 30)
    assert 550 in codes
    reason = data.query(lambda s: s.scalar(select(Identity.lock_reason).where(
        Identity.user_id == user, Identity.locked.is_(True))))
    assert reason.startswith("Compromise detection: risk")
    assert "volume" in reason or "spread" in reason


def test_shadow_mode_relays_everything_and_records_what_would_have_happened(
        instance, start_proxy, sink):
    data.add_user("example.com", "user", "alice@example.com", PW,
                  **dict(ENFORCE, detection_shadow_mode=True, detection_throttle_at=20,
                         detection_throttle_rate=1, detection_lock_at=80))
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PW)
        codes = blast(smtp, 40)
    assert set(codes) == {250}
    assert len(sink.handler.messages) == 40 and held_rows() == []
    actions = audit_actions()
    assert {"detection_would_throttle", "detection_would_hold",
            "detection_would_lock"} <= set(actions)


def test_failed_auth_then_success_from_a_new_network_scores_the_first_message(
        instance, start_proxy, sink):
    data.add_user("example.com", "user", "alice@example.com", PW,
                  **dict(ENFORCE, detection_hold_at=20))
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        try:
            smtp.login("alice@example.com", "wrong-password-1")
        except Exception:
            pass
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PW)
        assert send(smtp, message())[0] == 250
    assert held_rows() == [("alice@example.com", "held")]  # 15 + 8 points >= 20
    assert len(sink.handler.messages) == 0


def test_another_customers_failed_auth_as_ones_login_scores_nothing(
        instance, start_proxy, sink):
    """Customer A fails AUTH once with customer B's login, from A's own network: B's next
    sessions from B's network are not "failed AUTH followed by success" (DESIGN.md: no
    customer can push another up the ladder). A guess from the network that then logs in
    still is."""
    data.add_user("b.example", "user", "bob@b.example", PW,
                  **dict(ENFORCE, detection_new_sender_allowance=1000, detection_hold_at=20))
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.20") as smtp:
        smtp.login("bob@b.example", PW)  # a new network: 8 points (and a little content)
        assert send(smtp, message(), sender="bob@b.example")[0] == 250
    with client(proxy.port, source="127.0.1.66") as smtp:  # customer A's server
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("bob@b.example", "a-guess-1")
    for _ in range(2):
        with client(proxy.port, source="127.0.0.20") as smtp:
            smtp.login("bob@b.example", PW)
            assert send(smtp, message(), sender="bob@b.example")[0] == 250
    assert held_rows() == []
    assert len(sink.handler.messages) == 3

    with client(proxy.port, source="127.0.1.67") as smtp:  # the guessing network logs in
        smtp.login("bob@b.example", PW)
        assert send(smtp, message(), sender="bob@b.example")[0] == 250
    assert held_rows() == [("bob@b.example", "held")]


def test_failed_auth_before_a_password_this_proxy_verified_already_is_scored(
        instance, start_proxy, sink):
    """The second login's password is known to the process, so its block check and its
    success are one call: that call still asks whether the login failed just before."""
    data.add_user("example.com", "user", "alice@example.com", PW,
                  **dict(ENFORCE, detection_hold_at=15))
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PW)  # verified; the network is known from now on
    with client(proxy.port) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("alice@example.com", "wrong-password-1")
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PW)
        assert send(smtp, message())[0] == 250
    assert held_rows() == [("alice@example.com", "held")]  # the failure's 15 points alone
    assert len(sink.handler.messages) == 0


def test_new_network_alone_stays_below_the_hold(instance, start_proxy, sink):
    data.add_user("example.com", "user", "alice@example.com", PW,
                  **dict(ENFORCE, detection_hold_at=20))
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PW)
        assert send(smtp, message())[0] == 250
    assert held_rows() == [] and len(sink.handler.messages) == 1


def test_permanent_refusals_by_the_next_hop_raise_the_risk(instance, start_proxy, sink):
    data.add_user("example.com", "user", "alice@example.com", PW,
                  **dict(ENFORCE, detection_new_sender_allowance=1000, detection_hold_at=20))
    proxy = start_proxy()
    sink.handler.refuse_with = "550 5.1.1 No such user"
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PW)
        for i in range(8):
            send(smtp, message(to=f"u{i}@one.example", body=f"note number {i} for you\n"),
                 rcpts=[f"u{i}@one.example"])
        sink.handler.refuse_with = None
        for i in range(8, 14):
            send(smtp, message(to=f"u{i}@one.example", body=f"note number {i} for you\n"),
                 rcpts=[f"u{i}@one.example"])
    assert held_rows(), "refusals alone should have reached the Hold threshold"


def test_copying_a_rivals_newsletter_holds_the_copier_and_the_rival_keeps_sending(
        instance, start_proxy, sink):
    """Customer A blasts a copy of customer B's newsletter: A climbs the ladder, B's own
    mail keeps flowing (the cross-customer count only weighs A's own excess copies)."""
    data.add_user("a.example", "user", "mallory@a.example", PW, **ENFORCE)
    data.add_user("b.example", "user", "news@b.example", PW, **ENFORCE)
    newsletter = ("The B Weekly: our autumn collection is here, with new colours, free "
                  "returns and a preview of the winter catalogue for subscribers.\n")
    proxy = start_proxy()
    with client(proxy.port) as b:
        b.login("news@b.example", PW)
        for i in range(2):
            msg = message(sender="news@b.example", to=f"s{i}@sub{i}.example",
                          subject="The B Weekly", body=newsletter)
            assert send(b, msg, sender="news@b.example", rcpts=[f"s{i}@sub{i}.example"])[0] == 250
    with client(proxy.port) as a:
        a.login("mallory@a.example", PW)
        for i in range(40):
            rcpt = f"v{i}@victim{i}.example"
            msg = message(sender="mallory@a.example", to=rcpt, subject="The B Weekly",
                          body=newsletter)
            send(a, msg, sender="mallory@a.example", rcpts=[rcpt])
    assert any(identity == "mallory@a.example" for identity, _ in held_rows())
    before = len(sink.handler.messages)
    with client(proxy.port) as b:
        b.login("news@b.example", PW)
        msg = message(sender="news@b.example", to="s9@sub9.example", subject="The B Weekly",
                      body=newsletter)
        assert send(b, msg, sender="news@b.example", rcpts=["s9@sub9.example"])[0] == 250
    assert len(sink.handler.messages) == before + 1
    assert all(identity != "news@b.example" for identity, _ in held_rows())
