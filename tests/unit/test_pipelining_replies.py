"""The pipelined relay's reply reader: replies split anywhere across reads, several in one
read, multi-line replies joined as aiosmtplib joins them, and anything that is not an SMTP
reply (RFC 5321 4.2: three digits, then a space, a hyphen or the end) is an error, not a
reply."""

from __future__ import annotations

import pytest

from proxy.pipelining import MAX_REPLY_BYTES, NextHopGone, _Replies


def feed(*chunks: bytes) -> _Replies:
    replies = _Replies()
    for chunk in chunks:
        replies.data_received(chunk)
    return replies


def test_replies_split_and_joined_across_reads():
    replies = feed(b"250-first line\r\n25", b"0 second\r\n354", b"\r\n221 bye \r\n")
    assert list(replies.replies) == [(250, "first line\nsecond"), (354, ""), (221, "bye")]
    assert replies.error is None


@pytest.mark.parametrize("line", [b"2500 ok\r\n", b"25 ok\r\n", b"abc ok\r\n", b"250_ok\r\n"])
def test_what_is_not_a_reply_is_an_error(line):
    replies = feed(b"250 ok\r\n", line)
    assert list(replies.replies) == [(250, "ok")]
    assert isinstance(replies.error, NextHopGone)


def test_an_endless_reply_is_an_error():
    replies = feed(*[b"250-" + b"x" * 1000 + b"\r\n"] * (MAX_REPLY_BYTES // 1000 + 2))
    assert not replies.replies and isinstance(replies.error, NextHopGone)
    replies = feed(b"2" * (MAX_REPLY_BYTES + 1))
    assert isinstance(replies.error, NextHopGone)
