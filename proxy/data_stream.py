"""The DATA stream of an SMTP transaction, read in bulk (RFC 5321 4.1.1.4, 4.5.2).

aiosmtpd reads DATA a line at a time: about a hundred awaits and a hundred debug-log calls
for a 5 KB message, a third of a proxy process's CPU. Here the whole stream up to the
end-of-data line is found with one ``bytes.find`` per TCP segment, and the checks are bytes
operations over the whole message. The result is exactly aiosmtpd's: the same content, the
same replies, the same order between a too-long line and too much data
(``tests/integration/test_data_stream.py`` compares both on random streams split at random points).

The rules, as aiosmtpd has them:
- lines end with CRLF; a bare LF or CR is part of its line; the end is a line that is just
  ``.``, at the start of the data or after a CRLF;
- a line (its CRLF included) longer than ``line_limit`` makes the reply 500, and the data
  (its lines, CRLF and transparency dots included, not the end line) over ``size_limit``
  makes it 552; whichever comes first in the stream wins;
- a leading dot is removed from every line that has one.
"""

from __future__ import annotations

from enum import Enum

END = b"\r\n.\r\n"


class DataState(Enum):
    NOMINAL = "nominal"
    TOO_LONG = "too long"  # 500 Line too long
    TOO_MUCH = "too much"  # 552 Too much mail data
    NO_ROOM = "no room"  # 452 4.3.1: the process's DATA budget is spent (proxy/data_budget.py)


def end_of_data(buffer: bytes | bytearray, searched: int = 0) -> tuple[int, int] | None:
    """``(body_end, consumed)`` when ``buffer`` holds the end-of-data line: the data is
    ``buffer[:body_end]`` (its last CRLF included) and ``consumed`` bytes belong to this
    DATA. ``searched`` is how much of the buffer an earlier call saw (so each byte is looked
    at about once as segments arrive)."""
    if buffer[:3] == b".\r\n":
        return 0, 3
    found = buffer.find(END, max(0, searched - len(END) + 1))
    if found < 0:
        return None
    return found + 2, found + len(END)


def check(body: bytes, size_limit: int | None, line_limit: int) -> DataState:
    """What aiosmtpd decides about ``body`` (the data before the end line): fast for the
    common case, and line by line only when a limit is crossed."""
    too_much = bool(size_limit) and len(body) > size_limit
    if not too_much and (len(body) <= line_limit
                         or max(map(len, body.split(b"\r\n"))) + 2 <= line_limit):
        return DataState.NOMINAL
    return _first_fault(body, size_limit, line_limit)


def _first_fault(body: bytes, size_limit: int | None, line_limit: int) -> DataState:
    """aiosmtpd's order, line by line: a line longer than the stream reader's limit (its text
    over ``line_limit``) is found before its bytes are counted; a line that fits the reader
    but not the limit (its CRLF makes it too long) is counted first."""
    counted = 0
    start = 0
    while start < len(body):
        end = body.index(b"\r\n", start) + 2
        text = end - 2 - start
        if text > line_limit:
            return DataState.TOO_LONG
        counted += end - start
        if size_limit and counted > size_limit:
            return DataState.TOO_MUCH
        if end - start > line_limit:
            return DataState.TOO_LONG
        start = end
    return DataState.NOMINAL


def unstuff(body: bytes) -> bytes:
    """Remove the transparency dot of each line that starts with one (RFC 5321 4.5.2)."""
    if body[:1] == b".":
        body = body[1:]
    return body.replace(b"\r\n.", b"\r\n")
