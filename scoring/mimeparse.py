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

- lines are split as the feed parser splits them (``StringIO(newline="")``: after CRLF,
  LF or a lone CR);
- while the parser reads headers, and for any end-of-part test other than a boundary
  (``message/delivery-status`` blocks end at a blank line), lines go one at a time, as before;
- in a body, the next line that may end it is found among the lines that start with "--"
  (a boundary line can start with nothing else), and the parser's own boundary tests are
  applied to those.

The tests parse random MIME trees (nested, with stray and look-alike boundaries, bare line
endings, missing closings) both ways and compare the whole trees.
"""

from __future__ import annotations

import re
import types
from collections import deque
from email import feedparser
from email.feedparser import FeedParser
from email.message import Message
from io import StringIO

MAX_MISSES = 1000  # lines starting "--" that end no part, before reading line by line

# What feedparser's boundary pattern starts with: '(?P<sep>' + re.escape('--' + boundary).
_BOUNDARY_PATTERN = "(?P<sep>" + re.escape("--")


def _needs_dashes(pred) -> bool:
    """True for the parser's boundary test, which can match only a line starting "--"."""
    pattern = getattr(getattr(pred, "__self__", None), "pattern", None)
    return (getattr(pred, "__name__", "") == "match" and isinstance(pattern, str)
            and pattern.startswith(_BOUNDARY_PATTERN))


class _WholeInput:
    """``email.feedparser.BufferedSubFile`` for a message that is all there (closed)."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._text = ""
        self._at = 0  # offset of the next line in _text
        self._back: list[str] = []  # lines given back (unreadline), last first
        self._eofstack: list = []
        self.one_line_at_a_time = True  # set by the parser while it reads headers
        self._lines_only = False  # past MAX_MISSES: one line at a time to the end
        self._misses = 0
        self._pending: deque[str] | None = None  # the rest, split into lines (_lines_only)

    # -- what the parser calls -----------------------------------------------------------
    def push(self, data: str) -> None:
        self._parts.append(data)

    def close(self) -> None:
        self._text = "".join(self._parts)
        self._parts = []

    def push_eof_matcher(self, pred) -> None:
        self._eofstack.append(pred)

    def pop_eof_matcher(self):
        return self._eofstack.pop()

    def unreadline(self, line: str) -> None:
        self._back.append(line)

    def readline(self) -> str:
        if self._lines_only and self._pending is None:  # split the rest once, in C
            self._pending = deque(StringIO(self._text[self._at:], newline="").readlines())
        if self._back:
            line = self._back.pop()
        elif self._pending is not None:
            if not self._pending:
                return ""
            line = self._pending.popleft()
        elif self._at < len(self._text):
            end = self._line_end(self._at)
            line = self._text[self._at:end]
            self._at = end
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
        if (self._back or self.one_line_at_a_time
                or not all(_needs_dashes(pred) for pred in self._eofstack)):
            line = self.readline()
            if line == "":
                raise StopIteration
            return line
        start = self._at
        end = self._next_end(start) if self._eofstack else len(self._text)
        if end == start:
            if self._lines_only:  # it fell back at this very line, which ends nothing
                return self.__next__()
            raise StopIteration
        self._at = end
        return self._text[start:end]

    # -- lines in the text ----------------------------------------------------------------
    def _line_end(self, at: int) -> int:
        """Where the line starting at ``at`` ends, its line break included (after CRLF, LF
        or a lone CR, as ``StringIO(newline="")`` splits)."""
        text = self._text
        lf = text.find("\n", at)
        cr = text.find("\r", at, lf if lf >= 0 else len(text))
        if cr >= 0:
            return cr + 2 if text.startswith("\n", cr + 1) else cr + 1
        return lf + 1 if lf >= 0 else len(text)

    def _next_end(self, at: int) -> int:
        """The offset of the first line from ``at`` on that an end-of-part test matches
        (only a line starting "--" can), else the end of the text."""
        text = self._text
        candidate = at if text.startswith("--", at) else self._next_dashes(at)
        while candidate >= 0:
            line = text[candidate:self._line_end(candidate)]
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
        return len(text)

    def _next_dashes(self, at: int) -> int:
        """The start of the next line after ``at`` that starts with "--", else -1. Dashes
        inside a line send the search to the next line: one step per such line, not per
        dash."""
        text = self._text
        found = text.find("--", at + 1)
        while found >= 0:
            if text[found - 1] in "\r\n":
                return found
            found = text.find("--", self._line_end(found))
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
