"""The built-in spam scorer: a few cheap rules over the raw message and the envelope.

Pure and fast (no full MIME parse: a light splitter decodes only the text parts, bounded in
depth, count and size; every regex is linear). It never raises: unreadable input scores what
can be read. Rules, in the order they are reported:

============================  =======  =====================================================
rule                          score    fires when
============================  =======  =====================================================
GTUBE                         1000     the GTUBE test string appears anywhere (raw or in a
                                       decoded text part); always spam, whatever the threshold
FROM_ENVELOPE_MISMATCH        2.0      the From header's registrable domain differs from
                                       the envelope sender's (null sender exempt)
MISSING_FROM                  1.5      no From header, or one without an address
URL_SHORTENER                 1.5      a link points at a URL shortener (:data:`SHORTENERS`)
URL_NUMERIC_IP                1.5      a link's host is a bare IP address
SUBJECT_ALL_CAPS              1.5      the subject has 8+ letters and all are upper-case
MANY_RCPTS_ONE_LINK           2.5      20+ distinct recipients and exactly one distinct link
MISSING_DATE                  1.0      no Date header
MISSING_MESSAGE_ID            1.0      no Message-ID header
MISSING_SUBJECT               0.5      no Subject header, or an empty one
============================  =======  =====================================================

A message is spam when its score reaches ``threshold`` (default 5.0).
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from email.utils import getaddresses

from scoring.message import decode_words
from scoring.newdomains import registrable_domain

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

RULE_SCORES: dict[str, float] = {
    "GTUBE": 1000.0,
    "FROM_ENVELOPE_MISMATCH": 2.0,
    "MISSING_FROM": 1.5,
    "URL_SHORTENER": 1.5,
    "URL_NUMERIC_IP": 1.5,
    "SUBJECT_ALL_CAPS": 1.5,
    "MANY_RCPTS_ONE_LINK": 2.5,
    "MISSING_DATE": 1.0,
    "MISSING_MESSAGE_ID": 1.0,
    "MISSING_SUBJECT": 0.5,
}

SHORTENERS: frozenset[str] = frozenset({
    "bit.ly", "bitly.com", "tinyurl.com", "goo.gl", "t.co", "ow.ly", "is.gd", "v.gd",
    "buff.ly", "rebrand.ly", "cutt.ly", "shorturl.at", "tiny.cc", "rb.gy", "t.ly", "s.id",
    "bl.ink", "short.io", "tiny.one", "shorte.st", "adf.ly", "lnkd.in", "qrco.de", "urlz.fr",
    "clck.ru", "u.to", "x.co", "soo.gd", "trib.al", "y2u.be",
})

MANY_RECIPIENTS = 20
CAPS_MIN_LETTERS = 8

_MAX_HEAD = 256 * 1024  # header block inspected
_MAX_TEXT = 1024 * 1024  # decoded text inspected, all parts together
_MAX_PARTS = 200
_MAX_DEPTH = 10

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_URL = re.compile(rb"https?://[^\s<>\"']{1,2048}")
_BOUNDARY = re.compile(r"""(?i)\bboundary\s*=\s*(?:"([^"]{1,200})"|([^\s;"]{1,200}))""")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


@dataclass(frozen=True)
class SpamVerdict:
    """The score, whether it reached the threshold, and which rules fired (in doc order)."""

    is_spam: bool
    score: float
    rules: tuple[str, ...]
    engine: str = "builtin"


def score_message(
    raw: bytes, *, mail_from: str, rcpt_tos: list[str], threshold: float = 5.0
) -> SpamVerdict:
    """Score one message as submitted (``raw`` DATA, envelope sender and recipients)."""
    raw = bytes(raw or b"")
    head, body = _split(raw)
    headers = _headers(head)
    texts = _text_parts(raw, (headers, body))
    if GTUBE in raw or any(GTUBE in text for text in texts):
        return SpamVerdict(True, RULE_SCORES["GTUBE"], ("GTUBE",))
    links = _links(texts)
    hosts = {_host(link) for link in links}
    fired = []
    from_domain = _from_domain(headers)
    if from_domain is None:
        fired.append("MISSING_FROM")
    else:
        envelope = registrable_domain(mail_from or "")
        if envelope is not None and from_domain != envelope:
            fired.append("FROM_ENVELOPE_MISMATCH")
    if any(host.removeprefix("www.") in SHORTENERS for host in hosts):
        fired.append("URL_SHORTENER")
    if any(_IPV4.fullmatch(host) or host.startswith("[") for host in hosts):
        fired.append("URL_NUMERIC_IP")
    subject = _subject(headers)
    if subject is not None and _all_caps(subject):
        fired.append("SUBJECT_ALL_CAPS")
    distinct = {str(r).strip().lower() for r in rcpt_tos or ()}
    if len(distinct) >= MANY_RECIPIENTS and len(links) == 1:
        fired.append("MANY_RCPTS_ONE_LINK")
    if not headers.get("date", [""])[0].strip():
        fired.append("MISSING_DATE")
    if not headers.get("message-id", [""])[0].strip():
        fired.append("MISSING_MESSAGE_ID")
    if not subject:
        fired.append("MISSING_SUBJECT")
    rules = tuple(rule for rule in RULE_SCORES if rule in fired)
    score = round(sum(RULE_SCORES[rule] for rule in rules), 2)
    return SpamVerdict(score >= threshold, score, rules)


def _split(blob: bytes) -> tuple[bytes, bytes]:
    """Header block and body; a blob without a blank line is all headers."""
    if blob[:1] in (b"\n",) or blob[:2] == b"\r\n":
        return b"", blob[2 if blob[:2] == b"\r\n" else 1:]
    match = _HEAD_END.search(blob, 0, _MAX_HEAD)
    if match is None:
        return blob[:_MAX_HEAD], b""
    return blob[:match.start()], blob[match.end():]


def _headers(head: bytes) -> dict[str, list[str]]:
    """Unfolded header values by lower-case name, in order; lenient about garbage lines."""
    out: dict[str, list[str]] = {}
    name = None
    for line in head.decode("utf-8", "replace").splitlines():
        if line[:1] in (" ", "\t"):
            if name is not None:
                out[name][-1] += " " + line.strip()
            continue
        key, colon, value = line.partition(":")
        if not colon:
            name = None
            continue
        name = key.strip().lower()
        out.setdefault(name, []).append(value.strip())
    return out


def _param_boundary(content_type: str) -> str | None:
    match = _BOUNDARY.search(content_type)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).strip() or None


def _decode(body: bytes, encoding: str) -> bytes:
    """Undo the transfer encoding of a text part; the raw bytes when that fails."""
    try:
        if encoding == "base64":
            return binascii.a2b_base64(re.sub(rb"[^A-Za-z0-9+/=]", b"", body) + b"===")
        if encoding == "quoted-printable":
            return binascii.a2b_qp(body)
    except (binascii.Error, ValueError):
        return body
    return body


def _text_parts(raw: bytes, top: tuple[dict[str, list[str]], bytes] | None = None
                ) -> list[bytes]:
    """Decoded text/* bodies of the message (nested multiparts and message/rfc822 too);
    ``top``: the message's headers and body, when the caller has them already."""
    texts: list[bytes] = []
    budget = _MAX_TEXT
    stack: list[tuple[bytes, int, tuple | None]] = [(raw, 0, top)]
    seen = 0
    while stack and seen < _MAX_PARTS and budget > 0:
        entity, depth, parsed = stack.pop()
        seen += 1
        if parsed is None:
            head, body = _split(entity)
            headers = _headers(head)
        else:
            headers, body = parsed
        ctype_raw = headers.get("content-type", ["text/plain"])[0]
        ctype = ctype_raw.split(";", 1)[0].strip().lower() or "text/plain"
        if ctype.startswith("multipart/") and depth < _MAX_DEPTH:
            boundary = _param_boundary(ctype_raw)
            if boundary is not None:
                pieces = body.split(b"--" + boundary.encode("utf-8", "replace"))[1:]
                children = []
                for piece in pieces:
                    if piece.startswith(b"--"):
                        break  # the closing delimiter; the rest is epilogue
                    children.append((piece.lstrip(b" \t").removeprefix(b"\r\n")
                                     .removeprefix(b"\n"), depth + 1, None))
                stack.extend(reversed(children))
                continue
        if ctype == "message/rfc822" and depth < _MAX_DEPTH:
            stack.append((body, depth + 1, None))
            continue
        if ctype.startswith("text/") or ctype.startswith("multipart/"):
            encoding = headers.get("content-transfer-encoding", [""])[0].strip().lower()
            text = _decode(body[:budget * 2], encoding)[:budget]
            budget -= len(text)
            texts.append(text)
    return texts


def _links(texts: list[bytes]) -> set[str]:
    """Distinct http(s) links, HTML-unescaped enough that text and HTML copies coincide."""
    found: set[bytes] = set()
    for text in texts:
        found.update(_URL.findall(text))
    return {
        link.decode("utf-8", "replace").replace("&amp;", "&").rstrip(".,;:!?)]}>")
        for link in found
    }


def _host(link: str) -> str:
    """The lower-case host of an http(s) link, without user info, port or trailing dot."""
    rest = link.split("://", 1)[-1]
    for stop in "/?#\\":
        rest = rest.split(stop, 1)[0]
    rest = rest.rpartition("@")[2].lower()
    if rest.startswith("["):
        return rest.split("]", 1)[0] + "]"
    host, _, port = rest.rpartition(":")
    if host and port.isdigit():
        rest = host
    return rest.rstrip(".")


# "Name <local@domain>" or "local@domain", what nearly every From header is: the address is
# taken as it stands, where the e-mail package's address parser walks it a character at a time
# (a third of this scorer's time). Anything else (quotes, comments, several addresses, groups)
# goes to that parser.
_ADDR = r"[^\s<>()\[\]\\,;:@\"]+@[^\s<>()\[\]\\,;:@\"]+"
# No two quantifiers in a row can take the same character: linear on any input.
_SIMPLE_FROM = re.compile(rf"(?:[\w .'-]*<({_ADDR})>|\s*({_ADDR}))\s*")


def _from_domain(headers: dict[str, list[str]]) -> str | None:
    values = headers.get("from")
    if not values:
        return None
    simple = _SIMPLE_FROM.fullmatch(values[0][:2048])
    if simple is not None:
        return registrable_domain(simple.group(1) or simple.group(2))
    try:
        addresses = getaddresses([values[0][:2048]])
    except Exception:  # header garbage: treat as having no address
        return None
    for _, address in addresses:
        if "@" in address:
            domain = registrable_domain(address)
            if domain is not None:
                return domain
    return None


def _subject(headers: dict[str, list[str]]) -> str | None:
    values = headers.get("subject")
    if not values:
        return None
    return decode_words(values[0][:2048]).strip()  # undecodable: judge the raw text


def _all_caps(subject: str) -> bool:
    letters = [c for c in subject[:1000] if c.isalpha()]
    return len(letters) >= CAPS_MIN_LETTERS and all(c.isupper() for c in letters)
