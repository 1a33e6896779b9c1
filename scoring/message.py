"""Byte-level message handling the proxy needs before any policy: line endings and headers.

Work on the raw bytes rather than re-serialising a parsed message, so that what is relayed is
what was sent (DKIM signatures made downstream stay valid, bodies are not re-encoded).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@dataclass(frozen=True)
class LineEndings:
    data: bytes
    had_bare: bool


def normalise_line_endings(raw: bytes) -> LineEndings:
    """Turn bare CR and bare LF into CRLF, so nothing can smuggle an end-of-data past us."""
    fixed, count = _BARE.subn(b"\r\n", raw)
    return LineEndings(fixed, count > 0)


def header_block(raw: bytes) -> tuple[bytes, bytes]:
    """Split at the first empty line: (headers including the final CRLF, body)."""
    if raw.startswith(b"\r\n"):
        return b"", raw[2:]
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return raw, b""
    return head + b"\r\n", body


def remove_headers(raw: bytes, names: set[str] | frozenset[str] | tuple[str, ...]) -> bytes:
    """Drop every header field whose name is in ``names`` (case-insensitive), with its folds."""
    wanted = {n.lower().encode() for n in names}
    if not wanted:
        return raw
    head, body = header_block(raw)
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        dropping = name in wanted
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def subject_of(headers: list[tuple[str, str]]) -> str:
    for name, value in headers:
        if name.lower() == "subject":
            return value
    return ""


def parse_headers(raw: bytes, max_headers: int = 1000) -> list[tuple[str, str]]:
    """Header fields as decoded (name, unfolded value) pairs; never raises on bad input."""
    from email.header import decode_header, make_header

    head, _ = header_block(raw)
    fields: list[tuple[str, str]] = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip().decode("utf-8", "replace"))
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        fields.append((name.strip().decode("ascii", "replace"),
                       value.strip().decode("utf-8", "replace")))
        if len(fields) >= max_headers:
            break
    decoded = []
    for name, value in fields:
        try:
            value = str(make_header(decode_header(value)))
        except Exception:  # undecodable encoded-words stay as they came
            pass
        decoded.append((name, value))
    return decoded
