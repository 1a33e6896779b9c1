"""The PROXY protocol (v1 and v2) from the load balancers of SMTP_PROXY_PROTOCOL_FROM: the
client the header names is the one IP authentication, AUTH throttling and the Received:
header see. A header from anyone else is refused; a balancer's connection without one too.

Here 127.0.0.2 plays the load balancer and 198.51.100.x the customers behind it."""

from __future__ import annotations

import base64
import email
import email.policy
import ipaddress
import smtplib
import socket
import ssl
import struct

import pytest

from outgoing import redis_keys
from outgoing.config import ConfigError, load_config
from tests.support import data
from tests.support.mail import message, send

BALANCER = "127.0.0.2"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def header_v1(client_ip: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {client_ip} 127.0.0.1 {port} 25\r\n".encode()


def header_v2(client_ip: str, port: int = 40000, *, local: bool = False) -> bytes:
    if local:  # the balancer's own health check
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    addresses = (ipaddress.IPv4Address(client_ip).packed + ipaddress.IPv4Address("127.0.0.1")
                 .packed + struct.pack("!HH", port, 25))
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


class ProxiedSMTP(smtplib.SMTP):
    """smtplib, connecting from the balancer's address and sending ``header`` first."""

    def __init__(self, port: int, header: bytes, source: str = BALANCER):
        self._header = header
        super().__init__("127.0.0.1", port, timeout=15, source_address=(source, 0))

    def _get_socket(self, host, port, timeout):
        sock = socket.create_connection((host, port), timeout, self.source_address)
        sock.sendall(self._header)
        return sock


def proxied(port: int, header: bytes, *, starttls: bool = True) -> smtplib.SMTP:
    smtp = ProxiedSMTP(port, header)
    smtp.ehlo("client.example.com")
    if starttls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        smtp.starttls(context=context)
        smtp.ehlo("client.example.com")
    return smtp


def relayed_received(sink) -> str:
    raw = sink.handler.wait_for(1)[-1].data
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    return " ".join(str(parsed.get_all("Received")[0]).split())


def raw_exchange(port: int, payload: bytes, source: str) -> bytes:
    """Send ``payload`` at once and read everything until the proxy closes."""
    with socket.create_connection(("127.0.0.1", port), 10, (source, 0)) as sock:
        sock.sendall(payload)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        return received


SETTINGS = {"SMTP_PROXY_PROTOCOL_FROM": f"{BALANCER}/32, 10.0.0.0/8", "AUTH_FAILURE_LIMIT": 2}


@pytest.mark.parametrize("header", [header_v1, header_v2], ids=["v1", "v2"])
def test_the_real_client_authenticates_by_its_ip_and_is_named_in_received(
        instance, start_proxy, sink, header):
    data.add_user("example.com", "ip", "198.51.100.0/24")
    proxy = start_proxy(**SETTINGS)
    with proxied(proxy.port, header("198.51.100.7")) as smtp:  # STARTTLS keeps the client
        assert send(smtp, message())[0] == 250
    received = relayed_received(sink)
    assert received.startswith("from client.example.com ([198.51.100.7]) by ")
    assert BALANCER not in received


def test_the_balancer_address_itself_authenticates_nobody(instance, start_proxy, sink):
    data.add_user("example.com", "ip", "127.0.0.0/24")  # covers the balancer, not the client
    proxy = start_proxy(**SETTINGS)
    with proxied(proxy.port, header_v2("198.51.100.7"), starttls=False) as smtp:
        code, _ = smtp.mail("alice@example.com")
    assert code == 530
    assert sink.handler.messages == []


def test_auth_throttling_blocks_the_real_client_not_the_balancer(instance, start_proxy,
                                                                redis_client):
    data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123")
    data.add_user("example.com", "user", "carol@example.com", "Carol-pass-123")
    blob = base64.b64encode(b"\0alice@example.com\0wrong-password").decode()
    proxy = start_proxy(**SETTINGS)
    for _ in range(2):
        with proxied(proxy.port, header_v1("198.51.100.7")) as smtp:
            assert smtp.docmd("AUTH", f"PLAIN {blob}")[0] == 535
    blocks = redis_keys.AUTH_BLOCKS
    assert redis_client.zscore(blocks, redis_keys.auth_subject_ip("198.51.100.7")) is not None
    assert redis_client.zscore(blocks, redis_keys.auth_subject_ip(BALANCER)) is None
    good = base64.b64encode(b"\0carol@example.com\0Carol-pass-123").decode()
    with proxied(proxy.port, header_v1("198.51.100.8")) as smtp:  # another client: not blocked
        assert smtp.docmd("AUTH", f"PLAIN {good}")[0] == 235


def test_a_v2_local_health_check_gets_the_greeting(instance, start_proxy):
    proxy = start_proxy(**SETTINGS)
    with ProxiedSMTP(proxy.port, header_v2("0.0.0.0", local=True)) as smtp:
        assert smtp.noop()[0] == 250


def test_a_v2_local_header_that_carries_addresses_still_names_the_balancer(
        instance, start_proxy, sink):
    """LOCAL means the connection is the balancer's own: the addresses after it are to be
    ignored (the PROXY protocol's spec), not taken for a client's (they were: here the IP
    user's address, and its mail was relayed)."""
    data.add_user("example.com", "ip", "198.51.100.0/24")
    proxy = start_proxy(**SETTINGS)
    local = header_v2("198.51.100.7")
    local = local[:12] + bytes([0x20]) + local[13:]  # the LOCAL command, addresses kept
    with proxied(proxy.port, local, starttls=False) as smtp:
        code, _ = smtp.mail("alice@example.com")
    assert code == 530
    assert sink.handler.messages == []


def test_health_checks_are_no_customers_connections_whose_range_holds_the_balancer(
        instance, start_proxy, sink):
    """The balancer's checks (v2 LOCAL, from its own address) were counted as the
    connections of the IP user whose range holds that address: at its connection limit the
    checks got 421 and the balancer took every proxy out of service."""
    data.add_user("example.com", "ip", "127.0.0.0/24", connection_limits_enabled=True,
                  limit_per_minute=2)
    proxy = start_proxy(**SETTINGS)
    for _ in range(4):  # HAProxy's option smtpchk: EHLO, then QUIT
        reply = raw_exchange(proxy.port, header_v2("0.0.0.0", local=True)
                             + b"EHLO haproxy.localhost\r\nQUIT\r\n", source=BALANCER)
        assert reply.startswith(b"220 ") and b"\r\n250 " in reply, reply
    with proxied(proxy.port, header_v2("127.0.0.9"), starttls=False) as smtp:
        assert send(smtp, message())[0] == 250  # the customer's own first connection
    assert len(sink.handler.wait_for(1)) == 1


def test_a_proxy_header_from_elsewhere_is_refused(instance, start_proxy, sink):
    data.add_user("example.com", "ip", "198.51.100.0/24")
    # v1: the PROXY line comes as a command after the greeting; refused and closed.
    proxy = start_proxy(**SETTINGS)
    reply = raw_exchange(proxy.port, header_v1("198.51.100.7") + b"MAIL FROM:<a@b.example>\r\n",
                         source="127.0.0.5")
    assert reply.startswith(b"220 ")
    assert b"554 5.7.0 PROXY protocol header not accepted" in reply
    assert b"250" not in reply
    # v2: its signature ends in QUIT, so a server that does not expect it hangs up.
    reply = raw_exchange(proxy.port, header_v2("198.51.100.7") + b"MAIL FROM:<a@b.example>\r\n",
                         source="127.0.0.5")
    assert b"221" in reply and b"250" not in reply
    assert sink.handler.messages == []


def test_a_balancer_connection_without_a_header_is_closed_before_the_greeting(instance,
                                                                             start_proxy):
    proxy = start_proxy(**SETTINGS)
    reply = raw_exchange(proxy.port, b"EHLO client.example.com\r\n", source=BALANCER)
    assert reply == b""


def test_a_balancer_reaching_a_dual_stack_listener_over_ipv4_is_still_a_balancer(
        instance, start_proxy, sink):
    """Listening on [::], an IPv4 balancer's address is ::ffff:127.0.0.2: still the listed
    127.0.0.2, whose header names the client (it was refused with 554, and the client's
    mail bounced)."""
    data.add_user("example.com", "ip", "198.51.100.0/24")
    proxy = start_proxy(**SETTINGS, SMTP_LISTEN="[::]:0")
    with proxied(proxy.port, header_v1("198.51.100.7"), starttls=False) as smtp:
        assert send(smtp, message())[0] == 250
    assert relayed_received(sink).startswith("from client.example.com ([198.51.100.7]) by ")


def test_a_normal_client_from_elsewhere_needs_no_header(instance, start_proxy, sink):
    data.add_user("example.com", "ip", "127.0.0.0/24")
    proxy = start_proxy(**SETTINGS)
    smtp = smtplib.SMTP("127.0.0.1", proxy.port, timeout=15, source_address=("127.0.0.9", 0))
    with smtp:
        smtp.ehlo("client.example.com")
        assert send(smtp, message())[0] == 250
    assert "([127.0.0.9])" in relayed_received(sink)


def test_smtp_proxy_protocol_from_is_validated(instance):
    assert load_config({"SMTP_PROXY_PROTOCOL_FROM": "10.0.0.1, 192.0.2.0/24 ::1"})
    with pytest.raises(ConfigError, match="SMTP_PROXY_PROTOCOL_FROM"):
        load_config({"SMTP_PROXY_PROTOCOL_FROM": "10.0.0.1,haproxy.example"})
    for everyone in ("0.0.0.0/0", "10.0.0.1, 128.0.0.0/1", "::/0", "2001:db8::/31",
                     "::ffff:0.0.0.0/96", "::ffff:0.0.0.0/100", "::fffe:0:0/95"):
        with pytest.raises(ConfigError, match="SMTP_PROXY_PROTOCOL_FROM: .* too wide"):
            load_config({"SMTP_PROXY_PROTOCOL_FROM": everyone})
    assert load_config({"SMTP_PROXY_PROTOCOL_FROM": "10.0.0.0/8 2001:db8::/32 ::ffff:10.0.0.0/104"})
