"""The Received: header on relayed mail (RFC 5321 §4.4): client, user, protocol, over real
sockets to a real next hop; RECEIVED_HEADER=anonymous leaves the client out."""

from __future__ import annotations

import email
import email.policy

from tests.support import data
from tests.support.mail import client, message, send

PASSWORD = "Alice-pass-123"


def relayed_received(sink) -> list[str]:
    raw = sink.handler.wait_for(1)[-1].data
    assert raw.startswith(b"Received: ")
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    return [" ".join(str(v).split()) for v in parsed.get_all("Received")]


def test_an_authenticated_client_is_named_with_esmtpsa(instance, start_proxy, sink):
    data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.7") as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert send(smtp, message())[0] == 250
    [received] = relayed_received(sink)
    assert received.startswith("from client.example.com ([127.0.0.7]) by ")
    assert "with ESMTPSA id " in received
    assert "(authenticated as alice@example.com) for <bob@example.org>;" in received


def test_an_ip_user_over_tls_is_esmtps_and_its_range_is_named(instance, start_proxy, sink):
    data.add_user("example.com", "ip", "127.0.0.0/24")
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.9") as smtp:
        assert send(smtp, message(), rcpts=("bob@example.org", "carol@example.org"))[0] == 250
    [received] = relayed_received(sink)
    assert "with ESMTPS id " in received and "(IP/Range user 127.0.0.0/24)" in received
    assert "for <" not in received  # several recipients: none named


def test_anonymous_leaves_the_client_out(instance, start_proxy, sink):
    data.add_user("example.com", "ip", "127.0.0.0/24")
    proxy = start_proxy(RECEIVED_HEADER="anonymous")
    with client(proxy.port, source="127.0.0.9", starttls=False) as smtp:
        assert send(smtp, message())[0] == 250
    [received] = relayed_received(sink)
    assert "127.0.0.9" not in received and "client.example.com" not in received
    assert received.startswith("by ") and "with ESMTP id " in received
