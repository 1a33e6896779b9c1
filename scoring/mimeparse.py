"""The standard library's MIME parser, fed a whole message at once.

``email``'s feed parser is built for data that arrives in pieces: every line of every body
goes through its line buffer one at a time, and each is tested against every open boundary
(a Python call and a regular expression per line, about 0.8 ms for a 48 KB message with one
attachment, most of the attachment check). Given the whole message, the lines of a body up
to the next line that could end it can be handed over in one piece instead: the parser
only ever joins them (``_parsegen`` collects a body, an epilogue or a part without boundary
with ``for line in input`` and ``"".join``).

So the parse is the standard library's own code, its decisions (headers, boundaries,
preamble, epilogue, defects, nesting) unchanged; only the input object differs (and one
regular expression, see :class:`_EndOfText`):

- lines are split once, as the feed parser splits them (``StringIO(newline="")``: after
  CRLF, LF or a lone CR), with the offset where each starts;
- while the parser reads headers, and for any end-of-part test other than a boundary
  (``message/delivery-status`` blocks end at a blank line), lines go one at a time, as before;
- in a body, the next line that may end it is found among the lines that start with "--"
  (a boundary line can start with nothing else), and the parser's own boundary tests are
  applied to those.

The tests parse random MIME trees (nested, with stray and look-alike boundaries, bare line
endings, missing closings) both ways and compare the whole trees. On crafted input it stays
linear and near the library: from 0.2x (a 5 MB line of dashes) to 1.4x (100,000 empty parts)
the library's time; a message of many lines that look like boundaries is read line by line
past MAX_MISSES of them.
"""

from __future__ import annotations

import re
import types
from bisect import bisect_right
from email import feedparser
from email.feedparser import FeedParser
from email.message import Message
from io import StringIO
from itertools import accumulate

MAX_MISSES = 1000  # lines starting "--" that end no part, before reading line by line

# What feedparser's boundary pattern starts with: '(?P<sep>' + re.escape('--' + boundary).
_BOUNDARY_PATTERN = "(?P<sep>" + re.escape("--")


def _needs_dashes(pred) -> bool:
    """True for the parser's boundary test, which can match only a line starting "--"."""
    pattern = getattr(getattr(pred, "__self__", None), "pattern", None)
    return (getattr(pred, "__name__", "") == "match" and isinstance(pattern, str)
            and pattern.startswith(_BOUNDARY_PATTERN))


class _WholeInput:
    """``email.feedparser.BufferedSubFile`` for a message that is all there (closed): its
    lines split once, as the feed parser splits them, with the offset where each starts."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._text = ""
        self._lines: list[str] = []
        self._starts: list[int] = [0]  # offset of each line in _text, and the end
        self._next = 0  # index of the next line
        self._back: list[str] = []  # lines given back (unreadline), last first
        self._eofstack: list = []
        self._others: list[bool] = []  # per end-of-part test: not a boundary's
        self.one_line_at_a_time = True  # set by the parser while it reads headers
        self._lines_only = False  # past MAX_MISSES: one line at a time to the end
        self._misses = 0

    # -- what the parser calls -----------------------------------------------------------
    def push(self, data: str) -> None:
        self._parts.append(data)

    def close(self) -> None:
        self._text = "".join(self._parts)
        self._parts = []
        self._lines = StringIO(self._text, newline="").readlines()
        self._starts = [0, *accumulate(map(len, self._lines))]

    def push_eof_matcher(self, pred) -> None:
        self._eofstack.append(pred)
        self._others.append(not _needs_dashes(pred))

    def pop_eof_matcher(self):
        self._others.pop()
        return self._eofstack.pop()

    def unreadline(self, line: str) -> None:
        self._back.append(line)

    def readline(self) -> str:
        if self._back:
            line = self._back.pop()
        elif self._next < len(self._lines):
            line = self._lines[self._next]
            self._next += 1
        else:
            return ""
        for ateof in reversed(self._eofstack):
            if ateof(line):
                self._back.append(line)
                return ""
        return line

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self._back or self.one_line_at_a_time or True in self._others:
            line = self.readline()
            if line == "":
                raise StopIteration
            return line
        start = self._next
        end = self._next_end(start) if self._eofstack else len(self._lines)
        if end == start:
            if self._lines_only:  # it fell back at this very line, which ends nothing
                return self.__next__()
            raise StopIteration
        self._next = end
        return self._text[self._starts[start]:self._starts[end]]

    # -- lines in the text ----------------------------------------------------------------
    def _next_end(self, first: int) -> int:
        """The index of the first line from ``first`` on that an end-of-part test matches
        (only a line starting "--" can), else the number of lines."""
        if first >= len(self._lines):
            return first
        candidate = first if self._lines[first].startswith("--") else self._next_dashes(first)
        while candidate >= 0:
            line = self._lines[candidate]
            if any(ateof(line) for ateof in self._eofstack):
                return candidate
            self._misses += 1
            if self._misses > MAX_MISSES:
                # Many lines that start with "--" and end nothing (crafted, most likely):
                # each costs more here than a line does in the feed parser's own loop, so
                # the rest goes one line at a time, as the feed parser reads it, from this
                # line on (the piece before it is still body: __next__ returns it).
                self.one_line_at_a_time = self._lines_only = True
                return candidate
            candidate = self._next_dashes(candidate)
        return len(self._lines)

    def _next_dashes(self, index: int) -> int:
        """The index of the next line after line ``index`` that starts with "--", else -1.
        The text is searched for "--"; one inside a line sends the search on to the next
        line: a step per such line, not per line or per dash."""
        text, starts = self._text, self._starts
        found = text.find("--", starts[index + 1])
        while found >= 0:
            line = bisect_right(starts, found) - 1  # the line that holds it
            if starts[line] == found:
                return line
            found = text.find("--", starts[line + 1])
        return -1


class _EndOfText:
    """``feedparser.NLCRE_eol`` (``(\\r\\n|\\r|\\n)\\Z``) without its scan: ``re.search``
    tries the pattern at every offset of the string, a third of a millisecond for the payload
    of a 30 KB attachment, for the line break at its end."""

    class _Found:
        def __init__(self, ending: str) -> None:
            self._ending = ending

        def group(self, index: int = 0) -> str:
            return self._ending

    def search(self, text: str):
        for ending in ("\r\n", "\r", "\n"):
            if text.endswith(ending):
                return self._Found(ending)
        return None


# FeedParser._parsegen itself, with the one global above swapped in (its code object is the
# standard library's; the tests compare the trees it builds with the library's).
_parsegen = types.FunctionType(FeedParser._parsegen.__code__,
                               dict(vars(feedparser), NLCRE_eol=_EndOfText()), "_parsegen")


class _WholeParser(FeedParser):
    """The feed parser with :class:`_WholeInput`, which it tells when headers are read."""

    _parsegen = _parsegen

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._input = _WholeInput()

    def _new_message(self) -> None:
        super()._new_message()
        self._input.one_line_at_a_time = True  # _parsegen reads the headers next

    def _parse_headers(self, lines) -> None:
        super()._parse_headers(lines)
        self._input.one_line_at_a_time = self._input._lines_only


def parse_whole(raw: bytes, policy) -> Message:
    """What ``email.parser.BytesParser(policy=policy).parsebytes(raw)`` returns."""
    parser = _WholeParser(policy=policy)
    # The whole text before the first parse step: the input never runs short (the feed
    # parser's "need more data"), so close() parses it all in one go.
    parser._input.push(bytes(raw).decode("ascii", "surrogateescape"))
    return parser.close()
