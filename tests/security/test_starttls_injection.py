"""Plaintext sent after STARTTLS, before the handshake, never reaches the TLS session
(the command injection of CVE-2011-0411 and its kin in Exim and Dovecot): someone on the
path appends commands to the client's STARTTLS, and they would otherwise run, and be
answered, as if the client had sent them over TLS."""

from __future__ import annotations

import socket
import ssl

import pytest

from tests.support import data
from tests.support.mail import read_reply


def _tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.mark.parametrize("injected", [
    b"MAIL FROM:<mallory@example.net>\r\n",
    b"NOOP\r\nNOOP\r\n",
    b"RSET\r\nMAIL FROM:<mallory@example.net>\r\nRCPT TO:<victim@example.org>\r\n",
], ids=["MAIL", "two NOOPs", "a whole envelope"])
def test_plaintext_after_starttls_is_not_read_inside_tls(injected, instance, start_proxy,
                                                          sink):
    data.add_user("example.com", "ip", "127.0.0.5")  # MAIL would be accepted from here
    proxy = start_proxy()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10,
                                  source_address=("127.0.0.5", 0)) as sock:
        plain = sock.makefile("rb")
        assert read_reply(plain)[0] == 220
        sock.sendall(b"EHLO client.example.com\r\n")
        assert read_reply(plain)[0] == 250
        sock.sendall(b"STARTTLS\r\n" + injected)  # one segment: the injection rides along
        code, _ = read_reply(plain)
        if code != 220:  # refusing the STARTTLS that came with more is as good
            assert code in (-1, 421, 501, 503, 554)
            return
        plain.close()
        tls = _tls_context().wrap_socket(sock)
        reader = tls.makefile("rb")
        tls.sendall(b"EHLO client.example.com\r\n")
        # The first reply inside TLS answers the client's own EHLO, not an injected command.
        code, reply = read_reply(reader)
        assert code == 250 and reply.startswith(b"250-"), reply
        tls.sendall(b"MAIL FROM:<alice@example.com>\r\n")
        code, reply = read_reply(reader)
        assert code == 250, reply  # no transaction was opened before it
        tls.sendall(b"QUIT\r\n")
        assert read_reply(reader)[0] == 221
