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


def multipart(preamble: bytes, epilogue: bytes, part_header: bytes = b"") -> bytes:
    return (b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n" + preamble + b"\r\n"
            b"--b1\r\nContent-Type: text/plain\r\n" + part_header + b"\r\nshort text\r\n"
            b"--b1--\r\n" + epilogue)


def test_long_lines_of_the_preamble_and_the_epilogue_are_cut():
    """No reader shows the text around a multipart's parts, and the next hop would cut or
    refuse a line over 998 there as anywhere (and DKIM would break)."""
    preamble = b"This is a multi-part message. " + b"p" * 2500
    epilogue = b"e" * 1200 + b"\r\nend\r\n"
    fitted = fit_long_lines(multipart(preamble, epilogue))
    assert max(len(line) for line in lines(fitted)) <= MAX_LINE
    assert b"".join(lines(fitted)).count(b"p") >= 2500  # cut, not dropped
    assert b"--b1\r\nContent-Type: text/plain\r\n\r\nshort text\r\n--b1--\r\n" in fitted
    message = email.message_from_bytes(fitted, policy=email.policy.default)
    assert [p.get_content() for p in message.iter_parts()] == ["short text"]


def test_a_header_line_of_a_mime_part_over_998_characters_is_refused():
    with pytest.raises(HeaderLineTooLong):
        fit_long_lines(multipart(b"preamble", b"", part_header=b"X-Data: " + b"z" * 1200
                                 + b"\r\n"))


LINE = st.tuples(st.integers(0, 2100), st.sampled_from([b"\r\n", b"\n"]))


@given(st.lists(LINE, max_size=3), st.lists(LINE, max_size=3), st.lists(LINE, max_size=3),
       st.integers(0, 1100))
def test_whatever_the_lines_a_fitted_message_has_none_over_998(preamble, body, epilogue,
                                                               header):
    """Preamble, a part's body, epilogue and a part's header field of random lengths: the
    message is either refused (only for the header) or fitted, every line at most 998."""
    def text(pieces, letter):
        return b"".join(letter * n + end for n, end in pieces)

    raw = (b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n" + text(preamble, b"p")
           + b"\r\n--b1\r\nContent-Type: text/plain\r\nX-Note: " + b"h" * header + b"\r\n\r\n"
           + text(body, b"t") + b"\r\n--b1--\r\n" + text(epilogue, b"e"))
    try:
        fitted = fit_long_lines(raw)
    except HeaderLineTooLong:
        assert len(b"X-Note: ") + header > MAX_LINE
        return
    assert not has_long_line(fitted)


@given(st.binary(min_size=MAX_LINE + 1, max_size=3000))
def test_a_preamble_of_any_bytes_is_cut_and_kept_byte_for_byte(raw):
    """NUL, 8-bit and control bytes in the text before the parts, on one line longer than
    998: cut into lines, never changed or dropped."""
    preamble = b"x" + raw.replace(b"\r", b"x").replace(b"\n", b"x")  # one line, no boundary
    fitted = fit_long_lines(multipart(preamble, b""))
    assert not has_long_line(fitted)
    head, _, rest = fitted.partition(b"\r\n\r\n")
    assert rest.split(b"\r\n--b1\r\n")[0].replace(b"\r\n", b"") == preamble


HEADER_VALUE = st.binary(min_size=1, max_size=80).map(
    lambda b: b"v" + b.replace(b"\r", b"x").replace(b"\n", b"x"))


@given(top=HEADER_VALUE, part=HEADER_VALUE)
def test_header_fields_of_any_bytes_are_kept_byte_for_byte_when_a_body_is_reencoded(top, part):
    """A form feed, vertical tab or \\x1c-\\x1e followed by "name:" in a header field made the
    re-encoding raise (a 451 for ever), and without the "name:" the generator rewrote that
    byte as a line break: every header field, the message's and its parts', stays as it came."""
    top_head = b"From: a@example.com\r\nX-Top: " + top + b"\r\nMIME-Version: 1.0\r\n" \
        b"Content-Type: multipart/mixed; boundary=b1"
    part_head = b"Content-Type: text/plain\r\nX-Part: " + part
    raw = (top_head + b"\r\n\r\npreamble\r\n--b1\r\n" + part_head + b"\r\n\r\n"
           + b"t" * 1500 + b"\r\n--b1--\r\n")
    fitted = fit_long_lines(raw)
    assert not has_long_line(fitted)
    assert fitted.startswith(top_head + b"\r\n\r\n")
    assert b"\r\n--b1\r\n" + part_head + b"\r\nContent-Transfer-Encoding: quoted-printable" \
        in fitted


def test_a_form_feed_before_a_name_in_a_header_field_neither_raises_nor_becomes_a_line():
    raw = (b"From: a@example.com\r\nX-Note: a\x0cBcc: evil@example.net\r\n"
           b"Subject: x\x0b y\r\n\r\n" + b"x" * 1200 + b"\r\n")
    fitted = fit_long_lines(raw)
    assert fitted.startswith(b"From: a@example.com\r\nX-Note: a\x0cBcc: evil@example.net\r\n"
                             b"Subject: x\x0b y\r\n")
    assert b"\r\nBcc:" not in fitted
