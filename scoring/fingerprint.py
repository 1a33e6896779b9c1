"""The campaign fingerprint: one short key shared by copies of the same content.

A one-permutation MinHash of word 3-shingles over the normalised subject and body: the
smallest CRC-32 of any shingle. Two messages get the same key with a probability equal to the
Jaccard similarity of their shingle sets, so personalised copies (a name, a tracking link, an
order number) still collide, and unrelated mail almost never does. Normalising keeps letters
only (digits, punctuation, markup and URL tokens vanish) and drops base64-like runs. Cost: one
regular expression over at most 8 KB and a few hundred ``zlib.crc32`` calls, tens of
microseconds; stable across processes (``hash()`` is salted per process).

Why not TLSH or datasketch: TLSH gives a distance between two digests, not a key, so counting
copies would need a neighbour search per message; a 128-permutation MinHash costs
milliseconds in numpy per message and brings numpy along. One permutation is all a counter
needs.
"""

from __future__ import annotations

import re
import zlib

BODY_BYTES = 8192  # the start of a body is enough to tell copies apart
MIN_WORDS = 6  # too little text to call anything a campaign
_WORDS = re.compile(rb"[a-z]{2,14}")
_MARKUP = re.compile(rb"<[^>]{0,200}>|&[a-z]{2,8};|https?://\S+")


def normalised_words(subject: str, body: bytes) -> list[bytes]:
    text = subject.lower().encode("utf-8", "replace") + b" " + body[:BODY_BYTES].lower()
    text = _MARKUP.sub(b" ", text)
    return _WORDS.findall(text)


def fingerprint(subject: str, body: bytes, shingle: int = 3) -> str | None:
    """The campaign key of a message (8 hex digits), or None when it has too little text."""
    words = normalised_words(subject, body)
    if len(words) < MIN_WORDS:
        return None
    crc = zlib.crc32
    lowest = min(crc(b" ".join(words[i:i + shingle]))
                 for i in range(len(words) - shingle + 1))
    return f"{lowest:08x}"


def body_of(data: bytes) -> bytes:
    """The part after the header block (the whole message when it has none)."""
    end = data.find(b"\r\n\r\n")
    return data[end + 4:] if end >= 0 else data
