"""The proxy's walking skeleton over real sockets: AUTH, relay, quarantine, automatic lock."""

from __future__ import annotations

import json
import smtplib

import pytest
from sqlalchemy import select

from outgoing.models import OutgoingUser, QuarantinedMessage
from tests.support import data
from tests.support.mail import GTUBE, client, message, send

PASSWORD = "Alice-pass-123"


@pytest.fixture
def alice(instance):
    return data.add_user("example.com", "user", "alice@example.com", PASSWORD)


def test_authenticated_message_reaches_next_hop_before_250(alice, start_proxy, sink):
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        code, reply = send(smtp, message())
    assert code == 250
    assert len(sink.handler.messages) == 1
    got = sink.handler.messages[0]
    assert got.mail_from == "alice@example.com"
    assert got.rcpt_tos == ["bob@example.org"]
    assert b"Just saying hello." in got.data


def test_wrong_password_gets_535(alice, start_proxy):
    proxy = start_proxy()
    with client(proxy.port) as smtp, pytest.raises(smtplib.SMTPAuthenticationError) as err:
        smtp.login("alice@example.com", "not-her-password")
    assert err.value.smtp_code == 535


def test_unauthenticated_client_cannot_relay(alice, start_proxy, sink):
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        code, _ = smtp.mail("alice@example.com")
    assert code == 530
    assert sink.handler.messages == []


def test_auth_is_not_offered_before_starttls(alice, start_proxy):
    proxy = start_proxy()
    with client(proxy.port, starttls=False) as smtp:
        assert not smtp.has_extn("auth")
        code, _ = smtp.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHg=")
    assert code == 538


def test_gtube_is_quarantined_and_rejected_with_550(alice, start_proxy, sink):
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        code, reply = send(smtp, message(subject="Buy now", body=GTUBE))
    assert code == 550
    assert b"quarantined" in reply
    assert sink.handler.messages == []
    rows = data.query(lambda s: [(q.mail_from, json.loads(q.rcpt_tos), q.subject, q.storage_key)
                                 for q in s.scalars(select(QuarantinedMessage))])
    assert rows[0][:3] == ("alice@example.com", ["bob@example.org"], "Buy now")
    stored = (instance_path(proxy) / "storage" / rows[0][3]).read_bytes()
    assert GTUBE.encode() in stored


def instance_path(proxy):
    from pathlib import Path

    return Path(proxy.config["INSTANCE_PATH"])


def test_accepted_quarantine_response_answers_250_but_does_not_relay(instance, start_proxy,
                                                                      sink):
    data.add_user("example.com", "user", "carol@example.com", PASSWORD,
                  quarantine_response="accept")
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("carol@example.com", PASSWORD)
        code, _ = send(smtp, message(sender="carol@example.com", body=GTUBE),
                       sender="carol@example.com")
    assert code == 250
    assert sink.handler.messages == []
    assert data.query(lambda s: len(s.scalars(select(QuarantinedMessage)).all())) == 1


def test_fifth_spam_in_ten_minutes_locks_user(alice, start_proxy, clock, redis_client):
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        for _ in range(4):
            assert send(smtp, message(body=GTUBE))[0] == 550
            clock.advance(60)
        assert smtp.mail("alice@example.com")[0] == 250
        smtp.rset()
        assert send(smtp, message(body=GTUBE))[0] == 550
        code, reply = smtp.mail("alice@example.com")
    assert code == 550
    assert b"locked" in reply
    user = data.query(lambda s: s.get(OutgoingUser, alice))
    assert user.locked and user.lock_kind == "automatic"
    assert "5 spam messages in 10 minutes" in user.lock_reason


def test_spam_spread_over_more_than_ten_minutes_does_not_lock(alice, start_proxy, clock):
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        for _ in range(6):
            assert send(smtp, message(body=GTUBE))[0] == 550
            clock.advance(150)
        code, _ = smtp.mail("alice@example.com")
    assert code == 250


def test_next_hop_down_gives_451_not_250(alice, start_proxy, sink):
    proxy = start_proxy()
    sink.stop()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        code, _ = send(smtp, message())
    assert code == 451


def test_next_hop_refusal_is_passed_back(alice, start_proxy, sink):
    proxy = start_proxy()
    sink.handler.refuse_with = "554 5.7.1 sink says no"
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        code, reply = send(smtp, message())
    assert code == 554
    assert b"sink says no" in reply


def test_redis_down_gives_451(alice, start_proxy, redis_url):
    proxy = start_proxy(REDIS_URL="redis://127.0.0.1:1/0")
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        code, _ = smtp.mail("alice@example.com")
    assert code == 451
