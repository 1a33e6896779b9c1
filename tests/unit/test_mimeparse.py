"""``scoring.mimeparse.parse_whole`` builds the very tree ``email``'s own parser builds.

The attachment check judges what the parser finds; a faster parse that saw other parts (a
boundary missed, a part cut short, a nested message not opened) would let an attachment
through unseen. So random MIME trees, with everything that makes the parser's choices hard
(look-alike and repeated boundaries, an outer boundary inside an inner part, missing closings,
bare LF and lone CR line endings, preambles and epilogues, header lines without a colon,
delivery-status blocks, digests, nested messages), are parsed both ways and the whole trees
compared: headers, payloads, preamble, epilogue, defects, default types.
"""

from __future__ import annotations

import base64
from email.message import Message
from email.parser import BytesParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scoring import mimeparse
from scoring.attachments import _POLICY
from scoring.mimeparse import parse_whole

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "attachments"
SETTINGS = settings(max_examples=400, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def tree(msg: Message) -> dict:
    """Everything the parser decided about ``msg`` and its parts."""
    payload = msg._payload
    return {
        "headers": list(msg._headers),
        "unixfrom": msg.get_unixfrom(),
        "default_type": msg.get_default_type(),
        "preamble": msg.preamble,
        "epilogue": msg.epilogue,
        "defects": [type(d).__name__ for d in msg.defects],
        "payload": [tree(part) for part in payload] if isinstance(payload, list) else payload,
    }


def assert_same(raw: bytes) -> None:
    expected = BytesParser(policy=_POLICY).parsebytes(raw)
    assert tree(parse_whole(raw, _POLICY)) == tree(expected)


# -- random MIME ---------------------------------------------------------------------------
endings = st.sampled_from(["\r\n"] * 6 + ["\n", "\r", ""])
words = st.sampled_from(["text", "a b", "  ", "--", "-", "=", "From x", ":", "\t", "MZ",
                         "QUJD", "Zm9v", ">From", "."])
header_names = st.sampled_from(["X-A", "Subject", "Content-Disposition",
                                "Content-Transfer-Encoding", "Content-Type", "From"])


@st.composite
def boundary_like(draw, boundaries: list[str]) -> str:
    """A line that is, or nearly is, one of the open boundaries."""
    if not boundaries:
        return draw(words)
    b = draw(st.sampled_from(boundaries))
    return draw(st.sampled_from([f"--{b}", f"--{b}--", f"--{b} \t", f"--{b}--  ", f"--{b}x",
                                 f"-{b}", f" --{b}", f"--{b[:-1]}", f"----{b}", f"--{b}-"]))


@st.composite
def body_lines(draw, boundaries: list[str]) -> str:
    out = []
    for _ in range(draw(st.integers(0, 6))):
        if boundaries and draw(st.integers(0, 5)) == 0:
            line = draw(boundary_like(boundaries))
        else:
            line = " ".join(draw(st.lists(words, max_size=4)))
        out.append(line + draw(endings))
    return "".join(out)


@st.composite
def headers(draw, content_type: str | None) -> str:
    out = []
    if content_type is not None:
        out.append(f"Content-Type: {content_type}")
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.integers(0, 6))
        if kind == 0:
            out.append("no colon here")
        elif kind == 1:
            out.append(" continued")
        else:
            out.append(f"{draw(header_names)}: {draw(words)}")
    eol = draw(endings)
    return "".join(line + draw(endings) for line in out) + (eol if draw(st.booleans()) else "")


@st.composite
def entity(draw, depth: int, boundaries: list[str]) -> str:
    kind = draw(st.sampled_from(["leaf", "multipart", "message", "status"] if depth < 4
                                else ["leaf"]))
    if kind == "leaf":
        ctype = draw(st.sampled_from([None, "text/plain", "application/octet-stream; name=a.exe",
                                      "application/pdf"]))
        return draw(headers(ctype)) + draw(body_lines(boundaries))
    if kind == "message":
        return draw(headers("message/rfc822")) + draw(entity(depth + 1, boundaries))
    if kind == "status":
        return draw(headers("message/delivery-status")) + draw(body_lines(boundaries))
    boundary = draw(st.sampled_from(["b", "bb", "x=y", "==_1", "a b", "b" * 70]))
    if draw(st.integers(0, 4)) == 0:
        boundary = draw(st.sampled_from(boundaries or ["b"]))  # the same as an outer one
    quoted = f'"{boundary}"' if draw(st.booleans()) else boundary
    subtype = draw(st.sampled_from(["mixed", "alternative", "digest"]))
    param = draw(st.sampled_from([f"; boundary={quoted}", f";boundary={quoted}",
                                  f"; BOUNDARY={quoted}", ""]))
    inner = boundaries + [boundary]
    out = [draw(headers(f"multipart/{subtype}{param}")), draw(body_lines(inner))]
    for _ in range(draw(st.integers(0, 3))):
        space = draw(st.sampled_from(["", " ", "\t "]))
        out.append(f"--{boundary}{space}{draw(endings)}")
        out.append(draw(entity(depth + 1, inner)))
        if draw(st.integers(0, 4)) == 0:
            out.append(draw(endings))
    if draw(st.integers(0, 4)):
        space = draw(st.sampled_from(["", " "]))
        out.append(f"--{boundary}--{space}{draw(endings)}")
    out.append(draw(body_lines(inner)))
    return "".join(out)


@SETTINGS
@given(text=entity(0, []))
def test_random_trees_parse_as_the_standard_library_parses_them(text):
    assert_same(text.encode("utf-8", "surrogateescape"))


@SETTINGS
@given(text=entity(0, []))
def test_random_trees_parse_alike_when_it_falls_back_to_one_line_at_a_time(text):
    """Past MAX_MISSES look-alike lines the rest is read line by line (a crafted message
    of many "--" lines costs no more than in the feed parser); here from the first one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mimeparse, "MAX_MISSES", 0)
        assert_same(text.encode("utf-8", "surrogateescape"))


@pytest.mark.parametrize("text", [
    "Content-Type: multipart/mixed; boundary=b\r\n--b\r\n\r\n--\r\n",  # found by Hypothesis
    "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--c\r\ny\r\n--b--\r\n",
])
def test_the_fall_back_happens_at_a_line_that_ends_nothing(monkeypatch, text):
    monkeypatch.setattr(mimeparse, "MAX_MISSES", 0)
    assert_same(text.encode())


def test_many_look_alike_lines_fall_back_to_one_line_at_a_time(monkeypatch):
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n"
           + b"--x\r\n" * (mimeparse.MAX_MISSES + 10) + b"--b\r\nContent-Type: text/plain\r\n"
           b"\r\nafter\r\n--b--\r\n")
    calls = []
    monkeypatch.setattr(mimeparse._WholeInput, "_next_dashes",
                        lambda self, at, real=mimeparse._WholeInput._next_dashes:
                        calls.append(at) or real(self, at))
    assert_same(raw)
    assert len(calls) <= mimeparse.MAX_MISSES + 2


@SETTINGS
@given(raw=st.binary(max_size=400),
       cut=st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b"--b", b"--b--", b"\r\n\r\n",
                                     b"Content-Type: multipart/mixed; boundary=b\r\n"]),
                    max_size=12))
def test_random_bytes_around_boundaries_parse_alike(raw, cut):
    head = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
    assert_same(head + b"".join(part + raw[i::7] for i, part in enumerate(cut)) + raw)


def test_a_message_with_an_attachment_parses_alike_and_fast_path_is_taken(monkeypatch):
    """The bench's kind of message (text and a base64 attachment); the body of each part is
    read in one piece (a revert to one line at a time fails the count)."""
    attachment = base64.encodebytes(b"%PDF-1.4 " * 3000).decode().replace("\n", "\r\n")
    raw = ("From: a@example.com\r\nMIME-Version: 1.0\r\n"
           'Content-Type: multipart/mixed; boundary="==1=="\r\n\r\n'
           "--==1==\r\nContent-Type: text/plain\r\n\r\n" + "some text\r\n" * 200 +
           "--==1==\r\nContent-Type: application/pdf; name=q.pdf\r\n"
           "Content-Transfer-Encoding: base64\r\n\r\n" + attachment + "--==1==--\r\n")
    calls = []
    readline = mimeparse._WholeInput.readline
    monkeypatch.setattr(mimeparse._WholeInput, "readline",
                        lambda self: calls.append(1) or readline(self))
    assert_same(raw.encode())
    assert len(calls) < 40  # headers and boundaries, not the 600 lines of the bodies


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.iterdir()))
def test_fixture_attachments_parse_alike(name):
    data = (FIXTURES / name).read_bytes()
    body = base64.encodebytes(data).decode().replace("\n", "\r\n")
    raw = ("From: a@example.com\r\nContent-Type: multipart/mixed; boundary=z\r\n\r\n"
           f"--z\r\nContent-Type: application/octet-stream; name={name}\r\n"
           f"Content-Transfer-Encoding: base64\r\n\r\n{body}--z--\r\n")
    assert_same(raw.encode())
