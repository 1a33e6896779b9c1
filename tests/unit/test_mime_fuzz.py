"""Malformed MIME never makes attachment inspection raise or fall back to its fault verdict.

``inspect_attachments`` has a last-resort 451 for unexpected parser faults; reaching it on
any of these inputs would mean a malformed message can make senders retry forever, so the
property is "a real verdict", not merely "no exception". 200 examples in all (5 x 40).
"""

from __future__ import annotations

import base64
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scoring.attachments import REASON_ERROR, AttachmentVerdict, inspect_attachments

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "attachments"
MACRO_XLSM = (FIXTURES / "macro.xlsm").read_bytes()
ARCHIVES = [(FIXTURES / name).read_bytes()
            for name in ("macro.xlsm", "macro_xlsm.zip", "encrypted.zip", "macro.doc")]
FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

boundaries = st.text(alphabet=st.characters(codec="ascii"), max_size=80)
lines = st.sampled_from(["\r\n", "\n", "\r", ""])


def assert_defined(raw: bytes) -> AttachmentVerdict:
    verdict = inspect_attachments(raw, block_macros=True, block_unwanted=True)
    assert isinstance(verdict, AttachmentVerdict)
    assert verdict.reason != REASON_ERROR
    if verdict.blocked:
        assert verdict.reply.startswith("550 5.7.1 ")
        assert verdict.reply.isascii() and verdict.reply.isprintable()
    else:
        assert verdict.reply is None
    return verdict


@FUZZ
@given(declared=boundaries, used=boundaries, eol=lines, close=st.booleans(),
       quote=st.booleans())
def test_mismatched_missing_and_odd_boundaries(declared, used, eol, close, quote):
    param = f'"{declared}"' if quote else declared
    raw = (f"From: a@example.com{eol}MIME-Version: 1.0{eol}"
           f"Content-Type: multipart/mixed; boundary={param}{eol}{eol}"
           f"--{used}{eol}Content-Type: application/octet-stream; name=run.exe{eol}{eol}"
           f"MZ{eol}--{used}{'--' if close else ''}{eol}")
    assert_defined(raw.encode("ascii"))


@FUZZ
@given(payload=st.binary(max_size=3000), garbage=st.text(max_size=200),
       cte=st.sampled_from(["base64", "BASE64", "quoted-printable", "x-uuencode", "7bit",
                            "bogus"]))
def test_bad_transfer_encodings(payload, garbage, cte):
    body = base64.b64encode(payload).decode()
    cut = len(body) // 2
    body = body[:cut] + garbage + body[cut:]
    raw = ("From: a@example.com\r\nMIME-Version: 1.0\r\n"
           "Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
           "Content-Type: application/vnd.ms-excel; name=\"book.xlsm\"\r\n"
           f"Content-Transfer-Encoding: {cte}\r\n\r\n{body}\r\n--x--\r\n")
    assert_defined(raw.encode("utf-8", "surrogateescape"))


@FUZZ
@given(depth=st.integers(0, 120), kinds=st.lists(st.booleans(), min_size=1, max_size=8),
       closed=st.booleans())
def test_deep_nesting_of_multiparts_and_messages(depth, kinds, closed):
    head = []
    for level in range(depth):
        if kinds[level % len(kinds)]:
            head.append(f"Content-Type: multipart/mixed; boundary=b{level}\r\n\r\n--b{level}\r\n")
        else:
            head.append("Content-Type: message/rfc822\r\n\r\n")
    tail = [f"\r\n--b{level}--" for level in reversed(range(depth))
            if kinds[level % len(kinds)]] if closed else []
    leaf = ("Content-Type: application/octet-stream; name=a.xlsm\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(MACRO_XLSM).decode())
    verdict = assert_defined(("".join(head) + leaf + "".join(tail)).encode())
    assert verdict.blocked


@FUZZ
@given(size=st.integers(0, 300_000), name=st.sampled_from(["X-Junk", "Content-Type",
                                                          "Content-Disposition", "Subject"]),
       filler=st.sampled_from(["a", "=?utf-8?q?a?= ", " x=y;", ' "q;', "\r\n ", "\u00e9"]),
       data=st.binary(max_size=200))
def test_huge_and_hostile_headers(size, name, filler, data):
    value = filler * (size // len(filler))
    head = f"From: a@example.com\r\n{name}: {value}\r\nMIME-Version: 1.0\r\n\r\n"
    raw = head.encode() + data
    assert_defined(raw)


@FUZZ
@given(which=st.integers(0, len(ARCHIVES) - 1),
       edits=st.lists(st.tuples(st.integers(0, 9000), st.integers(0, 8), st.binary(max_size=8)),
                      min_size=1, max_size=6))
def test_corrupted_zips_and_ole_documents(which, edits):
    blob = bytearray(ARCHIVES[which])
    for at, cut, insert in edits:
        at %= len(blob) + 1
        blob[at:at + cut] = insert
    raw = (b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: application/zip; name=f.zip\r\nContent-Transfer-Encoding: base64"
           b"\r\n\r\n" + base64.encodebytes(bytes(blob)))
    assert_defined(raw)
