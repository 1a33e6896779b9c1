"""The delivery report (RFC 3464) to an ASCII sender goes without SMTPUTF8, so naming a
refused recipient with a non-ASCII address must leave its headers and its delivery-status
part ASCII: the Subject in encoded words, Final-Recipient as RFC 6533's utf-8 type."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

from worker.content_jobs import build_delivery_report


def report(refused):
    return build_delivery_report(
        sender="alice@example.com", reporter="postmaster@relay.example",
        reporting_mta="relay.example", refused=refused,
        original_headers=b"Subject: Hi\r\nFrom: alice@example.com\r\n",
        arrival=datetime(2026, 12, 2, tzinfo=UTC))


def test_a_non_ascii_recipient_leaves_the_headers_and_the_status_part_ascii():
    raw = report([["jürgen@bücher.example", 550, "5.1.1 Unbekannt: Jürgen"]])
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.isascii()
    status = body.split(b"Content-Type: message/delivery-status\r\n\r\n")[1].split(b"--=_og")[0]
    assert status.isascii()
    assert b"Final-Recipient: utf-8; j\\x{FC}rgen@b\\x{FC}cher.example\r\n" in status
    assert b"Diagnostic-Code: smtp; 550 5.1.1 Unbekannt: J\\x{FC}rgen\r\n" in status
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == "Undelivered mail: refused for jürgen@bücher.example"
    human = parsed.get_body(("plain",)).get_content()
    assert "jürgen@bücher.example: 550" in human  # the person reads it as it is


def test_an_ascii_recipient_is_reported_as_before():
    raw = report([["dave@example.org", 550, "5.1.1 No such user"]])
    assert b"Subject: Undelivered mail: refused for dave@example.org\r\n" in raw
    assert b"Final-Recipient: rfc822; dave@example.org\r\n" in raw
    assert b"Status: 5.1.1\r\n" in raw


def test_a_line_break_in_a_recipient_or_a_reply_adds_no_header_or_status_field():
    """The next hop's reply text is anyone's words, and a recipient comes from the stored
    envelope: a CR LF in either is folded onto its line, never a field of its own."""
    raw = report([["dave@example.org\r\nBcc: eve@evil.example", 550,
                   "5.1.1 gone\r\nReporting-MTA: dns; evil.example\nX-Injected: yes"]])
    head, _, body = raw.partition(b"\r\n\r\n")
    fields = [line.split(b":")[0] for line in head.split(b"\r\n") if line[:1] not in b" \t"]
    assert b"Bcc" not in fields
    assert b"\r\nX-Injected:" not in raw and b"\nX-Injected:" not in raw
    assert raw.count(b"\r\nReporting-MTA:") == 1
    assert (b"Final-Recipient: rfc822; dave@example.org Bcc: eve@evil.example\r\n"
            in raw)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Bcc"] is None


def test_eight_bit_original_headers_declare_their_encoding():
    """RFC 2045: a part with 8-bit data says so; without it a 7-bit transport may mangle it."""
    def headers_part(original):
        raw = build_delivery_report(
            sender="alice@example.com", reporter="postmaster@relay.example",
            reporting_mta="relay.example", refused=[["dave@example.org", 550, "5.1.1 No"]],
            original_headers=original, arrival=datetime(2026, 12, 2, tzinfo=UTC))
        return raw.split(b"Content-Type: text/rfc822-headers\r\n")[1].split(b"\r\n\r\n")[0]

    assert headers_part(b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n") == b"Content-Transfer-Encoding: 8bit"
    assert headers_part(b"Subject: Hi\r\n") == b"Content-Transfer-Encoding: 7bit"
