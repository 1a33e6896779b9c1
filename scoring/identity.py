"""Identity extraction: who, behind an outgoing user, actually sent a message.

Methods follow "Identification Method": the envelope sender, the authentication user, or a
header. Header rules are tried in order, each over the message's fields of that name in
message order; the first non-empty value wins. A rule may carry a regular expression, always
RE2 (linear time, no backtracking, so a hostile pattern or header cannot stall the proxy),
whose first group (or whole match when it has no group) is the identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import re2

from scoring.address import canonical_mailbox

ENVELOPE_SENDER = "envelope_sender"
AUTH_USER = "auth_user"
HEADER = "header"
METHODS = (ENVELOPE_SENDER, AUTH_USER, HEADER)

MAX_IDENTITY = 255  # characters kept of an identity value
MAX_PATTERN = 500  # characters of a regular expression (the form's and the column's bound)
MAX_HEADER_NAME = 100
MAX_REGEX_MEMORY = 1 << 20  # bytes RE2 may use to compile one pattern

_HINTS = (
    ("invalid perl operator: (?=", "lookahead (?=...) is not supported"),
    ("invalid perl operator: (?!", "negative lookahead (?!...) is not supported"),
    ("invalid perl operator: (?<", "lookbehind (?<=...) is not supported"),
    ("invalid perl operator: (?P", "named backreferences (?P=name) are not supported"),
    ("invalid perl operator: (?>", "atomic groups (?>...) are not supported"),
    *((f"invalid escape sequence: \\{d}", "backreferences like \\1 are not supported")
      for d in range(10)),
    ("invalid escape sequence: \\Z", "\\Z is written \\z in RE2"),
    ("invalid escape sequence", "this escape is not supported"),
    ("invalid repetition size", "repetition counts are at most {1000}"),
    ("bad repetition operator", "possessive or repeated quantifiers are not supported"),
    ("pattern too large", "the pattern is too large"),
)


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # errors are returned to the form, not printed to stderr
    options.max_mem = MAX_REGEX_MEMORY
    return options


def _compile(pattern: str) -> Any:
    """Compile with RE2 only; the pybind ``re2`` module has no fallback to Python's ``re``,
    so Perl-only syntax raises ``re2.error``."""
    return re2.compile(pattern, _options())


def validate_regex(pattern: str) -> str | None:
    """None when ``pattern`` is a usable RE2 expression (empty means "whole value"), else a
    message for the form saying what is wrong."""
    if not pattern:
        return None
    if len(pattern) > MAX_PATTERN:
        return f"The regular expression is too long (at most {MAX_PATTERN} characters)"
    try:
        _compile(pattern)
    except re2.error as error:
        detail = error.args[0] if error.args else ""
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        for prefix, hint in _HINTS:
            if str(detail).startswith(prefix):
                return f"Not a valid RE2 regular expression: {hint} ({detail})"
        return f"Not a valid RE2 regular expression: {detail}"
    except (TypeError, ValueError) as error:
        return f"Not a valid RE2 regular expression: {error}"
    return None


def validate_header_name(name: str) -> str | None:
    """None when ``name`` can be a header field name (RFC 5322: printable ASCII, no colon)."""
    if not name or not name.strip():
        return "Enter a header name, e.g. X-Client-ID"
    name = name.strip()
    if len(name) > MAX_HEADER_NAME:
        return f"The header name is too long (at most {MAX_HEADER_NAME} characters)"
    if any(not 33 <= ord(c) <= 126 or c == ":" for c in name):
        return "A header name is printable ASCII without spaces or colons"
    return None


@dataclass(frozen=True)
class HeaderRule:
    """One configured identification header, as entered."""

    header_name: str
    regex: str | None = None
    remove_header: bool = False


@dataclass(frozen=True, eq=False)
class CompiledRule:
    """One rule with its name lower-cased for matching and its pattern compiled once."""

    header_name: str
    key: str  # lower-cased name for matching
    regex: Any  # compiled RE2 pattern or None
    remove_header: bool


@dataclass(frozen=True, eq=False)
class CompiledRules:
    """Rules ready to use on every message; compile once per configuration load."""

    rules: tuple[CompiledRule, ...] = ()


@dataclass(frozen=True)
class IdentityResult:
    """The identity found, normalised (None: attribute the message to the outgoing user),
    where it came from ("envelope_sender", "auth_user", "header:<Name>", or "header" when no
    rule matched) and the header names to strip before relaying (compare case-insensitively)."""

    value: str | None
    source: str
    remove_headers: tuple[str, ...] = ()
    # Copies of the rule's header that name different identities: the message cannot be
    # identified (a sender adding a copy of its own would choose its identity, locked or not).
    conflicting: tuple[str, ...] = ()


def compile_rules(rules: Iterable[HeaderRule | Sequence[Any] | Any]) -> CompiledRules:
    """Compile (header name, regex or None/"", remove header) rules; ValueError names the
    first bad rule (forms should have caught it with ``validate_*``)."""
    compiled = []
    for position, rule in enumerate(rules, start=1):
        if hasattr(rule, "header_name"):  # HeaderRule or any object shaped like it
            name, pattern, remove = rule.header_name, rule.regex, rule.remove_header
        else:
            name, pattern, remove = rule
        problem = validate_header_name(name)
        if problem is None and pattern:
            problem = validate_regex(pattern)
        if problem is not None:
            raise ValueError(f"identification header {position}: {problem}")
        name = name.strip()
        regex = _compile(pattern) if pattern else None
        compiled.append(CompiledRule(name, name.lower(), regex, bool(remove)))
    return CompiledRules(tuple(compiled))


def compile_usable_rules(
    rules: Iterable[HeaderRule | Sequence[Any] | Any],
) -> tuple[CompiledRules, tuple[str, ...]]:
    """Like ``compile_rules`` but a bad rule is left out instead of failing them all: the
    proxy compiles every user's rules once per configuration load, and one stored bad pattern
    must not stop the others. Returns the rules and a problem text per rule left out."""
    compiled: list[CompiledRule] = []
    problems: list[str] = []
    for position, rule in enumerate(rules, start=1):
        try:
            compiled.extend(compile_rules([rule]).rules)
        except (ValueError, TypeError) as error:
            problems.append(str(error).replace("header 1:", f"header {position}:", 1))
    return CompiledRules(tuple(compiled)), tuple(problems)


def _without_surrogates(value: str) -> str:
    """Lone surrogates (from surrogateescape decoding) can be neither stored nor given to RE2."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _clean(value: str | None) -> str | None:
    """Single-line, printable, stripped, at most MAX_IDENTITY characters; None when empty."""
    if value is None:
        return None
    value = _without_surrogates(value).replace("\r\n", "").lstrip()
    value = "".join(c if c.isprintable() else " " for c in value[: 4 * MAX_IDENTITY])
    value = value.strip()[:MAX_IDENTITY].strip()
    return value or None


def normalise_identity(value: str | None) -> str | None:
    """The one spelling of an identity everywhere (Redis keys, the database, replies):
    cleaned as above, an address's needless quoting removed (``scoring.address``: the next
    hop reads ``"alice"@example.com`` as ``alice@example.com``) and lower-cased, so
    "Alice@Example.com" and "alice@example.com" are one sender. None when nothing is left."""
    if value is None:
        return None
    cleaned = _clean(canonical_mailbox(value.strip()))
    if cleaned is None:
        return None
    return cleaned.lower()[:MAX_IDENTITY].strip() or None


def _from_header(value: str, regex: Any) -> str | None:
    if regex is None:
        return normalise_identity(value)
    match = regex.search(_without_surrogates(value).replace("\r\n", ""))
    if match is None:
        return None
    return normalise_identity(match.group(1) if regex.groups else match.group(0))


def extract_identity(
    method: str,
    *,
    mail_from: str | None,
    auth_user: str | None,
    headers: Sequence[tuple[str, str]],
    rules: CompiledRules,
) -> IdentityResult:
    """Find the identity of one message by the user's identification method.

    With the header method every rule's header that is present and marked "remove header" is
    listed for removal, whether or not it gave the identity: the setting means that header
    must not reach recipients. The first rule whose header gives an identity decides; when
    its copies give different ones, ``conflicting`` lists them and there is no identity."""
    if method == ENVELOPE_SENDER:
        return IdentityResult(normalise_identity(mail_from), ENVELOPE_SENDER)
    if method == AUTH_USER:
        return IdentityResult(normalise_identity(auth_user), AUTH_USER)
    if method != HEADER:
        raise ValueError(f"unknown identification method {method!r}")

    present: dict[str, list[str]] = {}
    for name, value in headers:
        present.setdefault(name.strip().lower(), []).append(value)
    remove: dict[str, str] = {}
    for rule in rules.rules:
        if rule.remove_header and rule.key in present:
            remove.setdefault(rule.key, rule.header_name)
    removal = tuple(remove.values())

    for rule in rules.rules:
        found = [f for f in (_from_header(v, rule.regex) for v in present.get(rule.key, ()))
                 if f is not None]
        if found:
            source, distinct = f"{HEADER}:{rule.header_name}", tuple(dict.fromkeys(found))
            if len(distinct) > 1:
                return IdentityResult(None, source, removal, conflicting=distinct)
            return IdentityResult(found[0], source, removal)
    return IdentityResult(None, HEADER, removal)
