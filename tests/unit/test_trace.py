"""The Received: trace header: RFC 5321 §4.4 syntax, RFC 3848 keywords, hostile input."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

import pytest

from scoring.trace import received_header, with_keyword

WHEN = datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC)


def header(**overrides) -> bytes:
    values = dict(helo="mail.example.com", client_ip="192.0.2.10", by_host="og.example.net",
                  protocol="ESMTPSA", queue_id="4f2a9c", user_kind="authenticated as",
                  user_name="alice@example.com", when=WHEN, recipient="bob@example.org")
    values.update(overrides)
    return received_header(**values)


@pytest.mark.parametrize(("esmtp", "tls", "auth", "keyword"), [
    (False, False, False, "SMTP"), (True, False, False, "ESMTP"), (True, True, False, "ESMTPS"),
    (True, False, True, "ESMTPA"), (True, True, True, "ESMTPSA")])
def test_the_with_keyword_follows_rfc_3848(esmtp, tls, auth, keyword):
    assert with_keyword(esmtp=esmtp, tls=tls, authenticated=auth) == keyword


def test_the_header_names_client_user_protocol_and_date():
    raw = header()
    assert raw == (b"Received: from mail.example.com ([192.0.2.10])\r\n"
                   b"\tby og.example.net (Outbound Guard) with ESMTPSA id 4f2a9c\r\n"
                   b"\t(authenticated as alice@example.com)\r\n"
                   b"\tfor <bob@example.org>; Sun, 29 Nov 2026 10:00:00 +0000\r\n")
    parsed = email.message_from_bytes(raw + b"\r\nbody", policy=email.policy.default)
    assert "with ESMTPSA" in parsed["Received"]


def test_ipv6_clients_get_an_ipv6_literal_and_mapped_ipv4_is_ipv4():
    assert b"([IPv6:2001:db8::1])" in header(client_ip="2001:db8::1")
    assert b"([192.0.2.7])" in header(client_ip="::ffff:192.0.2.7")


def test_anonymous_leaves_out_the_client():
    raw = header(anonymous=True)
    assert b"192.0.2.10" not in raw and b"mail.example.com" not in raw
    assert raw.startswith(b"Received: by og.example.net (Outbound Guard) with ESMTPSA")


def test_no_recipient_is_named_for_several():
    assert b"for <" not in header(recipient=None)


@pytest.mark.parametrize("recipient", ["b\u00f8b@example.org", '"bo b"@example.org',
                                       '"b\\"ob"@example.org', "bob(x)@example.org",
                                       "b" * 300 + "@example.org"])
def test_a_recipient_that_cannot_be_written_as_it_is_is_not_named(recipient):
    """Taking out what the header cannot hold would name another mailbox (bøb -> bb)."""
    raw = header(recipient=recipient)
    assert b"for <" not in raw and raw.endswith(b"(authenticated as alice@example.com); "
                                                b"Sun, 29 Nov 2026 10:00:00 +0000\r\n")


@pytest.mark.parametrize("hostile", ["evil\r\nBcc: x@y", "a (b) \\c", "x" * 2000, "\x00\x7f",
                                     "ünïcode"])
def test_client_supplied_text_cannot_break_the_header(hostile):
    raw = header(helo=hostile, user_name=hostile, recipient=hostile)
    lines = raw.split(b"\r\n")
    assert lines[-1] == b"" and all(line[:1] in (b"R", b"\t") for line in lines[:-1])
    assert all(len(line) <= 998 for line in lines)
    assert raw.isascii()
    for line in lines[1:-1]:
        assert line.count(b"(") == line.count(b")")
