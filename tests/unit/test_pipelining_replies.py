"""The pipelined relay's reply reader: replies split anywhere across reads, several in one
read, multi-line replies joined, every line read as aiosmtplib reads it (so that a next
hop's answer means what it meant before PIPELINING: a sloppy "250ok" after the message is
still the next hop taking it), anything without a three-digit code an error, and a next hop
that will not stop answering cut off without a quadratic walk over what it sent."""

from __future__ import annotations

import asyncio

import aiosmtplib.protocol
import pytest

from proxy.pipelining import (
    MAX_QUEUED_REPLIES,
    MAX_REPLY_BYTES,
    MAX_REPLY_LINES,
    NextHopGone,
    _Replies,
)


def feed(*chunks: bytes) -> _Replies:
    replies = _Replies()
    for chunk in chunks:
        replies.data_received(chunk)
    return replies


def test_replies_split_and_joined_across_reads():
    replies = feed(b"250-first line\r\n25", b"0 second\r\n354", b"\r\n221 bye \r\n")
    assert list(replies.replies) == [(250, "first line\nsecond"), (354, ""), (221, "bye")]
    assert replies.error is None


@pytest.mark.parametrize("reply", [b"250 ok\r\n", b"250ok\r\n", b"2500 ok\r\n", b"250\r\n",
                                   b"250-a\r\n250 b\r\n", b"250-a\r\n250b\r\n",
                                   b"354 \t go \r\n", b"250 caf\xc3\xa9\r\n"])
def test_a_reply_means_what_it_meant_to_aiosmtplib(reply):
    async def theirs():
        protocol = aiosmtplib.protocol.SMTPProtocol()  # wants a running loop
        protocol._buffer = bytearray(reply)
        return protocol._read_response_from_buffer()

    expected = asyncio.run(theirs())
    assert list(feed(reply).replies) == [(expected.code, expected.message)]


@pytest.mark.parametrize("line", [b"25 ok\r\n", b"abc ok\r\n", b"2x0 ok\r\n", b"\r\n"])
def test_what_is_not_a_reply_is_an_error(line):
    replies = feed(b"250 ok\r\n", line)
    assert list(replies.replies) == [(250, "ok")]
    assert isinstance(replies.error, NextHopGone)


@pytest.mark.parametrize("flood", [
    b"250-" + b"x" * 1000 + b"\r\n",  # long lines
    b"250-\r\n",  # empty lines: each still counts
    b"250 x\r\n",  # complete replies nobody asked for
])
def test_a_flood_is_cut_off_in_linear_time(flood):
    count = 300_000 if len(flood) < 10 else MAX_REPLY_BYTES // len(flood) + 2
    replies = feed(flood * count)
    assert isinstance(replies.error, NextHopGone)
    assert len(replies.replies) <= MAX_QUEUED_REPLIES + 1
    assert len(replies._lines) <= MAX_REPLY_LINES + 1


def test_a_line_that_never_ends_is_an_error():
    assert isinstance(feed(b"2" * (MAX_REPLY_BYTES + 1)).error, NextHopGone)
    assert feed(b"2" * 100).error is None
