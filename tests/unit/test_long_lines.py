"""Body lines over 998 characters are re-encoded so the relayed message is RFC 5322
compliant; everything else stays byte for byte; over-long header lines are refused."""

from __future__ import annotations

import base64
import email
import email.policy
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scoring.message import MAX_LINE, HeaderLineTooLong, fit_long_lines, has_long_line

LONG_HTML = b"<p>" + "D\xe9j\xe0 vu ".encode("latin-1") * 900 + b"</p>"


def lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n")


def test_a_message_without_long_lines_is_returned_as_it_is():
    raw = b"From: a@example.com\r\nSubject: hi\r\n\r\n" + b"x" * MAX_LINE + b"\r\n"
    assert fit_long_lines(raw) is raw


def test_a_plain_8bit_text_with_a_long_line_becomes_quoted_printable():
    body = ("caf\u00e9 " * 1000).encode() + b"\r\nsecond line\r\n"
    raw = (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: long\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
           b"\r\n" + body)
    fitted = fit_long_lines(raw)
    assert max(len(line) for line in lines(fitted)) <= MAX_LINE
    message = email.message_from_bytes(fitted, policy=email.policy.default)
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    decoded = message.get_payload(decode=True)
    assert decoded.replace(b"\r\n", b"\n") == body.replace(b"\r\n", b"\n")
    assert fitted.startswith(b"From: a@example.com\r\nTo: b@example.org\r\nSubject: long\r\n")


def test_only_the_part_with_the_long_line_changes_in_a_multipart():
    attachment = (b"--b1\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64"
                  b"\r\n\r\n" + base64.encodebytes(b"%PDF" * 100).replace(b"\n", b"\r\n"))
    raw = (b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=b1\r\n\r\npreamble\r\n"
           b"--b1\r\nContent-Type: text/html; charset=latin-1\r\n\r\n" + LONG_HTML + b"\r\n"
           + attachment + b"--b1--\r\n")
    fitted = fit_long_lines(raw)
    assert max(len(line) for line in lines(fitted)) <= MAX_LINE
    assert attachment in fitted  # untouched, byte for byte
    html = email.message_from_bytes(fitted, policy=email.policy.default).get_body(("html",))
    assert html.get_payload(decode=True).rstrip(b"\r\n") == LONG_HTML


def test_a_non_text_part_on_one_long_line_is_rewrapped_as_base64():
    data = bytes(range(256)) * 20
    raw = (b"From: a@example.com\r\nMIME-Version: 1.0\r\nContent-Type: application/zip\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(data) + b"\r\n")
    fitted = fit_long_lines(raw)
    assert max(len(line) for line in lines(fitted)) <= MAX_LINE
    assert email.message_from_bytes(fitted).get_payload(decode=True) == data


def test_a_message_without_mime_headers_gets_them():
    raw = b"From: a@example.com\r\n\r\n" + b"y" * 3000 + b"\r\n"
    fitted = fit_long_lines(raw)
    message = email.message_from_bytes(fitted)
    assert message["MIME-Version"] == "1.0"
    assert message.get_payload(decode=True).rstrip(b"\r\n") == b"y" * 3000


def test_a_header_line_over_998_characters_is_refused():
    with pytest.raises(HeaderLineTooLong):
        fit_long_lines(b"From: a@example.com\r\nX-Data: " + b"z" * 1200 + b"\r\n\r\nbody\r\n")


@given(st.lists(st.tuples(st.integers(0, 1200), st.sampled_from([b"\r\n", b"\n", b"\r", b""])),
                max_size=6))
def test_the_fast_long_line_check_agrees_with_the_plain_definition(pieces):
    """has_long_line splits at LF for speed; it must find exactly what a search for 999
    characters without CR or LF finds."""
    data = b"".join(b"a" * n + end for n, end in pieces)
    assert has_long_line(data) == bool(re.search(rb"[^\r\n]{999}", data))
