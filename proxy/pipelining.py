"""A next-hop connection that sends MAIL, every RCPT and DATA in one write (RFC 2920).

aiosmtplib opens the connection (EHLO, STARTTLS, AUTH) and then hands its transport over:
it sends one command at a time and drops replies it did not ask for yet, so it cannot
pipeline. From then on this reads the replies in order. One write instead of three or
more, and one wake-up of the loop for the replies that come together, per message.

Only the transaction is here; what a reply means for the sender stays in ``proxy.relay``.
"""

from __future__ import annotations

import asyncio
from collections import deque

MAX_REPLY_BYTES = 64 * 1024  # a next hop that sends more in one reply is broken
MAX_REPLY_LINES = 1000
MAX_QUEUED_REPLIES = 4096  # more than a transaction asks (MAIL, 1,000 RCPTs, DATA)


class NextHopGone(ConnectionError):
    """The connection closed, or sent something that is not an SMTP reply."""


class _Replies(asyncio.Protocol):
    """Complete replies, in the order they came; a waiter wakes when one is there."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._reply_bytes = 0  # of the reply being read, line breaks included
        self.replies: deque[tuple[int, str]] = deque()
        self.error: Exception | None = None
        self._waiter: asyncio.Future | None = None

    def data_received(self, data: bytes) -> None:
        """Lines are read as aiosmtplib reads them (three digits; a "-" in the fourth place
        continues the reply; the text from the fifth), so that an answer means here what it
        meant through aiosmtplib; a reply of more than MAX_REPLY_BYTES or MAX_REPLY_LINES
        ends the connection."""
        if self.error is not None:
            return
        self._buffer += data
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            line = bytes(self._buffer[start:end]).rstrip(b"\r")
            self._reply_bytes += end + 1 - start
            start = end + 1
            if len(line) < 3 or not line[:3].isdigit():
                self._fail(NextHopGone(f"not an SMTP reply: {line[:100]!r}"))
                return
            self._lines.append(line[4:].strip(b" \t"))
            if self._reply_bytes > MAX_REPLY_BYTES or len(self._lines) > MAX_REPLY_LINES:
                self._fail(NextHopGone("reply too long"))
                return
            if line[3:4] != b"-":
                # bytes that are not UTF-8 (a Latin-1 "ü") are U+FFFD: the text goes on to
                # our client's reply and the sender's delivery report, which cannot hold them
                text = b"\n".join(self._lines).decode("utf-8", "replace")
                self._lines, self._reply_bytes = [], 0
                self.replies.append((int(line[:3]), text))
                if len(self.replies) > MAX_QUEUED_REPLIES:  # more than anything asked
                    self._fail(NextHopGone("replies nobody asked for"))
                    return
        del self._buffer[:start]
        if self._reply_bytes + len(self._buffer) > MAX_REPLY_BYTES:
            self._fail(NextHopGone("reply too long"))
            return
        if self.replies:
            self._wake()

    def eof_received(self) -> bool:
        self._fail(NextHopGone("the next hop closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(NextHopGone(f"connection lost: {exc}" if exc else "connection lost"))
        self.transport = None

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> tuple[int, str]:
        """The next reply; raises :class:`NextHopGone` when there will be none."""
        while not self.replies:
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.replies.popleft()


class PipelinedConnection:
    """A next-hop connection taken over from aiosmtplib after EHLO (and STARTTLS, AUTH)."""

    def __init__(self, transport: asyncio.Transport, extensions: dict[str, str]):
        self.extensions = extensions
        self._replies = _Replies()
        self._replies.transport = transport
        transport.set_protocol(self._replies)
        self.transport = transport

    @classmethod
    def take_over(cls, client) -> PipelinedConnection:
        """Take ``client``'s (an ``aiosmtplib.SMTP`` with no command under way) connection."""
        transport = client.transport
        if transport is None or transport.is_closing():
            raise NextHopGone("connection lost")
        return cls(transport, dict(client.esmtp_extensions))

    def supports(self, extension: str) -> bool:
        return extension.lower() in self.extensions

    @property
    def usable(self) -> bool:
        return (self._replies.error is None and self._replies.transport is not None
                and not self.transport.is_closing() and not self._replies.replies)

    def send(self, data: bytes) -> None:
        if self._replies.error is not None:
            raise self._replies.error
        if self.transport.is_closing():
            raise NextHopGone("connection lost")
        self.transport.write(data)

    async def reply(self) -> tuple[int, str]:
        return await self._replies.next()

    def close(self) -> None:
        self.transport.close()

    async def quit(self) -> None:
        """QUIT and wait for its reply (the caller bounds the wait)."""
        try:
            self.send(b"QUIT\r\n")
            await self.reply()
        except NextHopGone:
            pass
        finally:
            self.close()
