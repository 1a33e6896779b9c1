"""Byte-level message handling the proxy needs before any policy: line endings and headers.

Work on the raw bytes rather than re-serialising a parsed message, so that what is relayed is
what was sent (DKIM signatures made downstream stay valid, bodies are not re-encoded).
"""

from __future__ import annotations

import base64
import codecs
import email
import email.policy
import io
import quopri
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email import generator
from email.header import decode_header, make_header

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@dataclass(frozen=True)
class LineEndings:
    data: bytes
    had_bare: bool


def normalise_line_endings(raw: bytes) -> LineEndings:
    """Turn bare CR and bare LF into CRLF, so nothing can smuggle an end-of-data past us."""
    fixed, count = _BARE.subn(b"\r\n", raw)
    return LineEndings(CrlfLines(fixed), count > 0)


class CrlfLines(bytes):
    """Bytes in which every CR and LF is part of a CRLF, as checked where they were made
    (``crlf_lines``, ``normalise_line_endings``). The proxy's message is such bytes from
    DATA on, and each later step (the DKIM signer, the relay) would scan the whole of it
    again to know that: three scans each, a tenth of a millisecond for 48 KB. Slicing,
    joining or replacing gives plain bytes again, so the mark never outlives its check."""

    __slots__ = ()

    @classmethod
    def fromhex(cls, string: str) -> bytes:  # type: ignore[override]
        """Plain bytes: the one inherited way to make new, unchecked content of this class."""
        return bytes.fromhex(string)


def lines_end_in_crlf(data: bytes) -> bool:
    """Every CR and LF of ``data`` is part of a CRLF: known for ``CrlfLines``, else three
    scans (a few µs for 5 KB)."""
    if type(data) is CrlfLines:
        return True
    crlf = data.count(b"\r\n")
    return data.count(b"\r") == crlf and data.count(b"\n") == crlf


def crlf_lines(*parts: bytes) -> bytes:
    """The parts joined, as ``CrlfLines`` when every part's CR and LF are in CRLFs (then so
    are the joined bytes'), else as plain bytes."""
    joined = b"".join(parts)
    if all(lines_end_in_crlf(part) for part in parts):
        return CrlfLines(joined)
    return joined


def header_block(raw: bytes) -> tuple[bytes, bytes]:
    """Split at the first empty line: (headers including the final CRLF, body)."""
    if raw.startswith(b"\r\n"):
        return b"", raw[2:]
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return raw, b""
    return head + b"\r\n", body


def header_fields(head: bytes) -> Iterator[tuple[bytes | None, list[bytes]]]:
    """The lines of a header block (as ``header_block`` gives it) grouped into fields: each
    field's name (None for a line without a colon, and for a folded line that follows no
    line at all) and its lines, the first and those folded under it (starting with SP or
    HTAB). ``parse_headers`` and ``remove_headers`` both read fields this way, so the field
    a policy looked at is the field that is removed."""
    name: bytes | None = None
    lines: list[bytes] | None = None
    for line in head.split(b"\r\n")[:-1]:
        folded = line[:1] in (b" ", b"\t")
        if folded and lines is not None:
            lines.append(line)
            continue
        if lines is not None:
            yield name, lines
        field, colon, _ = line.partition(b":")
        name, lines = (field.strip() if colon and not folded else None), [line]
    if lines is not None:
        yield name, lines


def starts_folded(raw: bytes) -> bool:
    """The message's first line starts with SP or HTAB: a continuation with no field before
    it (RFC 5322 2.2.3). A trace field put before it would take it in as its own folded
    line."""
    return raw[:1] in (b" ", b"\t")


# A header field's first line: a name of printable ASCII but colon, maybe the obsolete
# white space (RFC 5322 4.5.3), then the colon; or a folded line (SP or HTAB first).
_FIELD_OR_FOLD = re.compile(rb"[!-9;-~]+[ \t]*:|[ \t]")


def line_not_a_field(raw: bytes) -> bytes | None:
    """The first line of the header block that is neither a header field nor a fold of one
    (no colon, white space inside the name, a byte outside printable ASCII in it), or None.

    Receivers read such a line differently: Postfix ends the header there and takes it and
    the fields after it for the body, and DKIM signers refuse to parse the message. So the
    header that policy checked (From, the identification header) would not be the header
    delivered, and the message could not be signed."""
    head, _ = header_block(raw)
    match = _FIELD_OR_FOLD.match
    for line in head.split(b"\r\n")[:-1]:
        if match(line) is None:
            return line
    return None


def remove_headers(raw: bytes, names: set[str] | frozenset[str] | tuple[str, ...]) -> bytes:
    """Drop every header field whose name is in ``names`` (case-insensitive), with its folds."""
    wanted = {n.lower().encode() for n in names}
    if not wanted:
        return raw
    head, body = header_block(raw)
    kept = [line for name, lines in header_fields(head)
            if name is None or name.lower() not in wanted for line in lines]
    return b"".join(line + b"\r\n" for line in kept) + b"\r\n" + body


def subject_of(headers: list[tuple[str, str]]) -> str:
    for name, value in headers:
        if name.lower() == "subject":
            return value
    return ""


def decode_words(value: str) -> str:
    """A header value with its RFC 2047 encoded words decoded, as the e-mail package decodes
    them (``str(make_header(decode_header(value)))``); undecodable ones stay as they came.
    A value without "=?" has none, and the package would give it back unchanged after
    building a Header of it (about 6 µs a field, a dozen fields a message): it is returned
    at once."""
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except Exception:  # undecodable encoded-words stay as they came
        return value


MAX_HEADER_FIELDS = 1000  # more in one message: refused (see proxy.handler)


def parse_headers(raw: bytes, max_headers: int = MAX_HEADER_FIELDS) -> list[tuple[str, str]]:
    """Header fields as decoded (name, unfolded value) pairs, the first ``max_headers`` of
    them; never raises on bad input. Lines that are no field (see ``header_fields``) are
    left out, with their folds."""
    head, _ = header_block(raw)
    fields: list[tuple[str, str]] = []
    for name, lines in header_fields(head):
        if name is None:
            continue
        value = b" ".join([lines[0].partition(b":")[2].strip(),
                           *(line.strip() for line in lines[1:])])
        fields.append((name.decode("ascii", "replace"),
                       value.decode("utf-8", "replace")))
        if len(fields) >= max_headers:
            break
    return [(name, decode_words(value)) for name, value in fields]


@dataclass(frozen=True)
class Part:
    content_type: str
    filename: str | None
    size: int
    text: str | None  # decoded text of text/* parts (HTML as its source), else None


@dataclass(frozen=True)
class MessageView:
    """What the control panel shows of a stored message: nothing in it is ever rendered as
    HTML, only shown as text (templates escape it)."""

    headers: list[tuple[str, str]]
    parts: list[Part]
    truncated: bool
    error: str | None = None


def _decoded(value: str) -> str:
    from email.header import decode_header, make_header

    try:
        return str(make_header(decode_header(value)))
    except Exception:  # undecodable encoded-words stay as they came
        return value


# Codecs Python finds under a name a message may declare, that are no character sets:
# idna and undefined raise whatever the error handler, punycode is quadratic in the text.
_NOT_CHARSETS = frozenset({"idna", "punycode", "undefined"})


def text_of(data: bytes, part: email.message.Message) -> str:
    """A text part's bytes as text in its declared charset (UTF-8 when it declares none);
    UTF-8 with replacements when that charset is unknown, no character set, or its codec
    fails on these bytes."""
    try:
        charset = part.get_content_charset() or "utf-8"
        if codecs.lookup(charset).name not in _NOT_CHARSETS:
            return data.decode(charset, "replace")
    except (LookupError, UnicodeError, ValueError, TypeError):
        pass
    return data.decode("utf-8", "replace")


def readable(raw: bytes, *, max_parts: int = 100, max_text: int = 256 * 1024,
             max_header: int = 8192) -> MessageView:
    """Headers and parts of a message for reading, bounded in parts, text and header size;
    never raises (a message the parser cannot read comes back with ``error``)."""
    from email.parser import BytesParser
    from email.policy import compat32

    try:
        msg = BytesParser(policy=compat32).parsebytes(bytes(raw))
    except Exception as exc:  # a defined result for any input (deep nesting too)
        return MessageView(parse_headers(raw), [], True, f"unreadable MIME: {exc}")
    headers = [(str(k), _decoded(str(v))[:max_header]) for k, v in msg.items()]
    parts: list[Part] = []
    budget = max_text
    truncated = False
    try:
        walker = msg.walk()
        for part in walker:
            if part.is_multipart():
                continue
            if len(parts) >= max_parts:
                truncated = True
                break
            ctype = part.get_content_type()
            try:
                filename = part.get_filename()
                filename = _decoded(filename)[:300] if filename else None
            except Exception:
                filename = None
            try:
                payload = part.get_payload(decode=True) or b""
            except Exception:
                payload = b""
            text = None
            if ctype.startswith("text/") and budget > 0:
                text = text_of(payload[:budget], part)
                truncated = truncated or len(payload) > budget
                budget -= min(len(payload), budget)
            parts.append(Part(ctype, filename, len(payload), text))
    except RecursionError:
        truncated = True
    return MessageView(headers, parts, truncated)


MAX_LINE = 998  # RFC 5322 2.1.1: characters per line, CRLF not counted
_LONG_LINE = re.compile(rb"[^\r\n]{%d}" % (MAX_LINE + 1))


def has_long_line(data: bytes) -> bool:
    """A line of more than 998 characters (CR or LF ends a line). Runs on every message:
    splitting at LF costs microseconds, where the regular expression alone tries a
    999-character match at every offset (0.6 ms for 5 KB); it only looks at the rare
    pieces that are long enough."""
    if len(data) <= MAX_LINE:
        return False
    pieces = data.split(b"\n")
    if max(map(len, pieces)) <= MAX_LINE:  # the usual case, without a Python step per line
        return False
    return any(_LONG_LINE.search(piece) for piece in pieces if len(piece) > MAX_LINE)


def leaf_body(part: email.message.Message) -> bytes:
    """A MIME leaf's body as it came, still transfer-encoded, as the generator writes it.
    Not ``get_payload()``: for 8-bit text that decodes with the declared charset, which
    raises on a hostile one (idna, undefined, a NUL in the name, an RFC 2231 charset
    parameter) and can move line ends (unicode_escape makes a line break of a backslash
    and an n), so the lines it measures are not the lines relayed."""
    payload = part._payload  # what Generator._handle_text reads too
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogateescape")  # the bytes the parser was given
    return payload if isinstance(payload, bytes) else b""


class HeaderLineTooLong(ValueError):
    """A header line over 998 characters: we cannot rewrite it without changing its meaning,
    and the next hop may refuse or truncate it."""


def fit_long_lines(raw: bytes) -> bytes:
    """The message with every body line at most 998 characters (RFC 5322 2.1.1), so the next
    hop takes it as it is and DKIM survives: each MIME leaf with a longer line is re-encoded,
    text as quoted-printable and anything else as base64, both safe for MIME. Everything
    else stays byte for byte. Web forms and scripts send long HTML lines; Postfix would
    accept and wrap them, so refusing them bounces legitimate mail."""
    if not has_long_line(raw):
        return raw
    head, _ = header_block(raw)
    if has_long_line(head):
        raise HeaderLineTooLong("a header line is longer than 998 characters")
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    for part in message.walk():
        if part.is_multipart():  # the text around its parts, which no reader shows
            part.preamble, part.epilogue = _wrapped(part.preamble), _wrapped(part.epilogue)
            continue
        if not has_long_line(leaf_body(part)):
            continue
        decoded = part.get_payload(decode=True) or b""
        del part["Content-Transfer-Encoding"]
        if part.get_content_maintype() == "text":
            part.set_payload(quopri.encodestring(decoded).decode("ascii"))
            part["Content-Transfer-Encoding"] = "quoted-printable"
        else:
            part.set_payload(base64.encodebytes(decoded).decode("ascii"))
            part["Content-Transfer-Encoding"] = "base64"
        if "MIME-Version" not in message:
            message["MIME-Version"] = "1.0"
    out = io.BytesIO()
    _VerbatimHeaders(out, mangle_from_=False, policy=email.policy.compat32.clone(
        linesep="\r\n", max_line_length=0)).flatten(message)
    fitted = out.getvalue()
    if has_long_line(fitted):  # what is left is a MIME part's own header line
        raise HeaderLineTooLong("a header line of a MIME part is longer than 998 characters")
    return fitted


class _VerbatimHeaders(generator.BytesGenerator):
    """Writes every header field as it came, folds included. The stock generator runs each
    ASCII value through ``email.header.Header``, which also breaks lines at a vertical tab,
    a form feed and \\x1c-\\x1e (``str.splitlines``): it rewrote such a byte as a line break
    and a space, and raised when a "name:" followed it (a 451 for ever, on a message that
    only needed a long line re-encoded)."""

    def _write_headers(self, msg) -> None:
        for name, value in msg.raw_items():
            self._fp.write(f"{name}: {value}".encode("ascii", "surrogateescape"))
            self.write(self._NL)
        self.write(self._NL)


_LONG_TEXT_LINE = re.compile(rf"[^\r\n]{{{MAX_LINE + 1},}}")


def _wrapped(text: str | None) -> str | None:
    """A multipart's preamble or epilogue with its lines cut at 998 characters: MIME readers
    ignore both (RFC 2046 5.1.1), so where a line breaks changes nothing anyone reads. The
    parser gives them as one character per byte (surrogateescape), so characters are bytes."""
    if text is None or len(text) <= MAX_LINE:
        return text
    return _LONG_TEXT_LINE.sub(
        lambda m: "\r\n".join(m[0][i:i + MAX_LINE] for i in range(0, len(m[0]), MAX_LINE)),
        text)
