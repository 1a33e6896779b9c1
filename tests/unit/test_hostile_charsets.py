"""A part's declared charset is the sender's to choose, and Python has codecs under names a
message may declare that raise whatever the error handler (idna, undefined, punycode on
8-bit bytes), names with a NUL, and RFC 2231 parameters the e-mail package hands over as a
tuple. None of that may make the content pipeline raise (a 451 for ever) or fall back to its
fault verdict, and the long-line re-encoding must measure the lines that are relayed."""

from __future__ import annotations

import email
import email.policy

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.content import local_checks
from scoring.attachments import REASON_ERROR
from scoring.message import MAX_LINE, fit_long_lines, parse_headers, readable

TRICKY = ["idna", "undefined", "punycode", "utf-16", "utf-32", "utf-7", "unicode_escape",
          "raw_unicode_escape", "rot13", "base64", "hex", "zlib", "uu", "quopri", "charmap",
          "mbcs", "x-unknown", "bogus\x00", "utf-8'en'x", "", "utf-8", "latin-1"]
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

charsets = st.one_of(st.sampled_from(TRICKY),
                     st.text(alphabet=st.characters(codec="ascii", exclude_characters="\r\n"),
                             max_size=20))


def param(charset: str, form: str) -> str:
    return {"plain": f"charset={charset}", "quoted": f'charset="{charset}"',
            "rfc2231": f"charset*=us-ascii''{charset}"}[form]


def text_message(charset_param: str, body: bytes, cte: str = "8bit") -> bytes:
    return (f"From: a@example.com\r\nTo: b@example.org\r\nSubject: charsets\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; {charset_param}\r\n"
            f"Content-Transfer-Encoding: {cte}\r\n\r\n").encode() + body


def body_of(raw: bytes) -> bytes:
    return email.message_from_bytes(raw, policy=email.policy.compat32).get_payload(decode=True)


def test_an_idna_text_with_a_long_8bit_line_is_reencoded_as_quoted_printable():
    body = "Déjà vu, ".encode("latin-1") * 200 + b"\r\nshort\r\n"
    raw = text_message("charset=idna", body)
    fitted = fit_long_lines(raw)
    assert max(map(len, fitted.split(b"\r\n"))) <= MAX_LINE
    assert b"Content-Transfer-Encoding: quoted-printable" in fitted
    assert body_of(fitted).replace(b"\r\n", b"\n") == body.replace(b"\r\n", b"\n")


def test_a_charset_that_moves_line_ends_cannot_hide_a_long_line():
    """unicode_escape decodes a backslash and an n as a line break: measured on that text, a
    2,000-character line looked like five short ones and was relayed as it came."""
    body = b"\xe9" + (b"a" * 400 + b"\\n") * 5 + b"\r\n"
    fitted = fit_long_lines(text_message("charset=unicode_escape", body))
    assert max(map(len, fitted.split(b"\r\n"))) <= MAX_LINE
    assert body_of(fitted).rstrip(b"\r\n") == body.rstrip(b"\r\n")


def test_the_panel_shows_a_text_in_an_idna_or_punycode_charset_as_utf8():
    for charset in ("idna", "punycode", "undefined"):
        shown = readable(text_message(f"charset={charset}", "café\r\n".encode()))
        assert shown.error is None
        assert shown.parts[0].text.rstrip() == "café"


@FUZZ
@given(charset=charsets, form=st.sampled_from(["plain", "quoted", "rfc2231"]),
       lines=st.lists(st.tuples(st.binary(max_size=40), st.integers(0, 60)), min_size=1,
                      max_size=5),
       cte=st.sampled_from(["8bit", "7bit", "binary", "quoted-printable", "base64", "bogus"]),
       attached=st.booleans())
# Random bytes can be a file type that is refused (a .reg file here): then no spam score.
@example(charset="idna", form="plain", lines=[(b"Windows Registry Editor", 1)], cte="8bit",
         attached=True)
def test_any_charset_and_any_bytes_go_through_the_content_pipeline(charset, form, lines, cte,
                                                                   attached):
    # Lines of random bytes (no CR or LF: the proxy made every line end a CRLF before),
    # some of them repeated past 998 characters.
    body = b"\r\n".join((chunk.replace(b"\r", b"").replace(b"\n", b"") or b"x") * times
                        for chunk, times in lines) + b"\r\n"
    if attached:
        raw = (f"From: a@example.com\r\nMIME-Version: 1.0\r\n"
               f"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
               f"Content-Type: text/plain; {param(charset, form)}\r\n"
               f"Content-Transfer-Encoding: {cte}\r\n\r\n").encode() + body + (
            f"--b\r\nContent-Type: application/octet-stream; {param(charset, form)}\r\n"
            f"Content-Disposition: attachment; filename=a.bin\r\n"
            f"Content-Transfer-Encoding: {cte}\r\n\r\n").encode() + body + b"--b--\r\n"
    else:
        raw = text_message(param(charset, form), body, cte)

    fitted = fit_long_lines(raw)
    assert max(map(len, fitted.split(b"\r\n"))) <= MAX_LINE
    attachments, spam = local_checks(fitted, mail_from="a@example.com",
                                     rcpt_tos=["b@example.org"], block_macros=True,
                                     block_unwanted=True, builtin_spam=True, threshold=5.0)
    assert attachments.reason != REASON_ERROR
    assert attachments.blocked or spam is not None
    assert readable(fitted).error is None
    assert readable(raw).error is None
    assert parse_headers(fitted)[0] == ("From", "a@example.com")
