"""The SMTP reply for each outcome of the conversation, as data.

Codes follow the design: authentication and locks are permanent (5xx), anything internal or
volume-related is temporary (4xx) so the sender keeps the message and retries.
"""

from __future__ import annotations

OK = "250 2.0.0 OK"
QUEUED = "250 2.0.0 Message accepted"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure, try again later"
AUTH_BLOCKED = "454 4.7.0 Too many failed authentication attempts, try again later"
AUTH_MALFORMED = "501 5.5.2 Malformed AUTH data"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode base64"
AUTH_TOO_LONG = "501 5.5.2 AUTH data too long"
AUTH_IN_TRANSACTION = "503 5.5.1 AUTH is not permitted during a mail transaction"
AUTH_OTHER_IDENTITY = "535 5.7.8 Cannot authorize as another identity than the one authenticated"
LINE_TOO_LONG = "500 5.5.2 Line too long"
TEMPORARY = "451 4.3.0 Temporary failure, please try again later"
NEXT_HOP_DOWN = "451 4.4.1 Next hop unavailable, please try again later"
BARE_LINE_ENDING = "550 5.6.11 Bare CR or LF in message data is not allowed"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients for one message"
DETECTION_THROTTLED = "451 4.7.1 Sending rate limited for this sender, please try again later"


def _clean(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def user_locked(name: str, reason: str | None) -> str:
    why = f": {_clean(reason)}" if reason else ""
    return f"550 5.7.1 Outgoing user {_clean(name, 100)} is locked{why}; contact your administrator"


def identity_locked(identity: str, reason: str | None) -> str:
    why = f": {_clean(reason)}" if reason else ""
    return f"550 5.7.1 Sender {_clean(identity, 100)} is locked{why}; contact your administrator"


def ambiguous_identity(source: str, values: tuple[str, ...]) -> str:
    header = source.partition(":")[2] or source
    names = ", ".join(_clean(v, 60) for v in values[:3])
    return (f"550 5.7.1 The {_clean(header, 60)} headers of this message name different senders "
            f"({names}); send it with one")


def quarantined(quarantine_response: str, rules: tuple[str, ...] | list[str]) -> str:
    """Rejected (550) tells the sender; Accepted (250) keeps the quarantine silent."""
    if quarantine_response == "accept":
        return QUEUED
    named = ", ".join(rules[:5]) if rules else "policy"
    return f"550 5.7.1 Message rejected as spam ({_clean(named, 120)}); it was quarantined"


def next_hop_refused(code: int, message: str) -> str:
    """Pass a next hop's permanent refusal on as it came; anything else becomes temporary."""
    if 500 <= code < 600:
        return f"{code} {_clean(message, 300)}"
    return f"451 4.4.0 Next hop answered {code}: {_clean(message, 200)}"
HEADER_LINE_TOO_LONG = ("550 5.6.0 A header line of this message is longer than 998 characters "
                        "(RFC 5322 2.1.1); fold it")
STARTS_FOLDED = ("550 5.6.0 The message starts with a space or tab: a folded line with no "
                 "header field before it (RFC 5322 2.2.3); remove the leading whitespace")


def not_a_header_field(line: bytes) -> str:
    """A line of the header block that is no field (see ``scoring.message.line_not_a_field``)."""
    shown = _clean("".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}"
                           for c in line[:60].decode("latin-1")), 60).replace('"', "'")
    return ("550 5.6.0 A line of this message's header is not a header field (RFC 5322 "
            f"2.2): \"{shown}\"; receiving servers would take it and what follows for the "
            "body, and it cannot be DKIM-signed")


TOO_MANY_HEADER_FIELDS = ("550 5.6.0 The message has more than 1000 header fields; "
                          "send fewer")
