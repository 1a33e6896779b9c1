"""Clients may pipeline (RFC 2920): EHLO offers PIPELINING, and MAIL, RCPTs and DATA sent in
one write are answered in order, as are the message and QUIT sent together; a refused MAIL
leaves the rest of its group nothing to act on."""

from __future__ import annotations

import socket
import ssl

import pytest

from tests.support import data
from tests.support.mail import read_reply


def _connect(port: int, source: str):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0))
    reader = sock.makefile("rb")
    assert read_reply(reader)[0] == 220
    return sock, reader


def test_ehlo_offers_pipelining_before_and_after_starttls(instance, start_proxy):
    proxy = start_proxy()
    sock, reader = _connect(proxy.port, "127.0.0.1")
    sock.sendall(b"EHLO client.example.com\r\n")
    code, reply = read_reply(reader)
    assert code == 250 and b"250-PIPELINING\r\n" in reply and reply.endswith(b"250 HELP\r\n")
    sock.sendall(b"STARTTLS\r\n")
    assert read_reply(reader)[0] == 220
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tls = context.wrap_socket(sock)
    reader = tls.makefile("rb")
    tls.sendall(b"EHLO client.example.com\r\n")
    code, reply = read_reply(reader)
    assert code == 250 and b"250-PIPELINING\r\n" in reply and b"250-AUTH " in reply
    tls.close()


def test_a_pipelined_transaction_is_answered_in_order_and_relayed(instance, start_proxy,
                                                                   sink):
    data.add_user("example.com", "ip", "127.0.0.5")
    proxy = start_proxy()
    sock, reader = _connect(proxy.port, "127.0.0.5")
    sock.sendall(b"EHLO client.example.com\r\n")
    assert read_reply(reader)[0] == 250
    sock.sendall(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\n"
                 b"RCPT TO:<carol@example.net>\r\nDATA\r\n")
    assert [read_reply(reader)[0] for _ in range(4)] == [250, 250, 250, 354]
    sock.sendall(b"From: alice@example.com\r\nSubject: pipelined\r\n\r\nhello\r\n.\r\n"
                 b"QUIT\r\n")
    assert read_reply(reader)[0] == 250
    assert read_reply(reader)[0] == 221
    sock.close()
    [got] = sink.handler.messages
    assert got.mail_from == "alice@example.com"
    assert got.rcpt_tos == ["bob@example.org", "carol@example.net"]
    assert b"Subject: pipelined" in got.data


def test_a_refused_mail_leaves_its_pipelined_rcpt_and_data_nothing_to_act_on(
        instance, start_proxy, sink):
    proxy = start_proxy()  # 127.0.0.9 is nobody's: MAIL needs AUTH
    sock, reader = _connect(proxy.port, "127.0.0.9")
    sock.sendall(b"EHLO client.example.com\r\n")
    assert read_reply(reader)[0] == 250
    sock.sendall(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
                 b"Subject: smuggled\r\n\r\nnot a message\r\n.\r\nQUIT\r\n")
    codes = [read_reply(reader)[0] for _ in range(3)]
    assert codes[0] == 530 and codes[1] == 503 and codes[2] == 503
    while (code := read_reply(reader)[0]) not in (221, -1):
        assert code >= 500  # the would-be message's lines are unknown commands
    sock.close()
    assert sink.handler.messages == []


@pytest.mark.parametrize("hostname", [b"evil (x) \\y\x00\x7f", "\u00fcn\u00efcode".encode(),
                                      b"h" * 480, b"[192.0.2.1]"],
                         ids=["control characters", "UTF-8", "480 characters", "literal"])
def test_the_ehlo_name_the_hook_keeps_cannot_break_the_received_header(hostname, instance,
                                                                      start_proxy, sink):
    """The EHLO hook stores the client's name for the Received: field, whatever it is."""
    data.add_user("example.com", "ip", "127.0.0.5")
    proxy = start_proxy()
    sock, reader = _connect(proxy.port, "127.0.0.5")
    sock.sendall(b"EHLO " + hostname + b"\r\n")
    assert read_reply(reader)[0] == 250
    sock.sendall(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    assert [read_reply(reader)[0] for _ in range(3)] == [250, 250, 354]
    sock.sendall(b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert read_reply(reader)[0] == 250
    sock.close()
    [got] = sink.handler.messages
    head = got.data.split(b"\r\n\r\n", 1)[0]
    received = head.split(b"\r\nSubject:", 1)[0]
    assert received.startswith(b"Received: from ") and received.isascii()
    lines = received.split(b"\r\n")
    assert all(line[:1] in (b"R", b"\t") and len(line) <= 998 for line in lines)
    assert b"\x00" not in received and b"\x7f" not in received
