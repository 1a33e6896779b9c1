"""The ``Received:`` trace header the proxy adds to each relayed message (RFC 5321 §4.4).

It says who handed us the message (the HELO name and client address, unless the provider
chose ``anonymous``), which outgoing user it ran under, how (RFC 3848's ``with`` keywords:
ESMTP, ESMTPS with TLS, ESMTPSA with TLS and SMTP AUTH, ...) and when. Every value that came
from the client is reduced to characters that cannot end the comment or the header.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from email.utils import format_datetime
from functools import lru_cache

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\]")  # controls, spaces, non-ASCII, comment syntax
MAX_TEXT = 255


def with_keyword(*, esmtp: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848: SMTP, ESMTP, ESMTPA, ESMTPS, ESMTPSA."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def _safe(text: str | None, fallback: str = "unknown") -> str:
    cleaned = _UNSAFE.sub("", text or "")[:MAX_TEXT]
    return cleaned or fallback


@lru_cache(maxsize=4096)
def _literal(ip: str | None) -> str:
    """The client address as an RFC 5321 address literal (cached: clients come back)."""
    try:
        address = ipaddress.ip_address((ip or "").split("%", 1)[0])
    except ValueError:
        return "unknown"
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return f"IPv6:{address.compressed}"
    return str(address)


def received_header(*, helo: str | None, client_ip: str | None, by_host: str, protocol: str,
                    queue_id: str, user_kind: str, user_name: str, when: datetime,
                    recipient: str | None = None, anonymous: bool = False) -> bytes:
    """One folded ``Received:`` field, CRLF-terminated, to put before the message's own.

    ``user_kind`` says how the outgoing user authenticated ("authenticated as" for a login,
    "IP/Range" for an address). ``recipient`` is named only for one-recipient messages, as
    Postfix does, so a message's other recipients are not disclosed to each other, and only
    when it can be written as it is: with a space, a backslash, a parenthesis or a non-ASCII
    character taken out it would be another mailbox (``bøb@x.test`` read ``bb@x.test``)."""
    if anonymous:
        origin = ""
    else:
        origin = f"from {_safe(helo)} ([{_literal(client_ip)}])\r\n\t"
    lines = (f"Received: {origin}by {_safe(by_host, 'outbound-guard')} (Outbound Guard) "
             f"with {protocol} id {_safe(queue_id)}\r\n\t"
             f"({user_kind} {_safe(user_name)})")
    if recipient and _safe(recipient) == recipient:  # else it would name another mailbox
        lines += f"\r\n\tfor <{recipient}>"
    return f"{lines}; {_date(when.replace(microsecond=0))}\r\n".encode()


@lru_cache(maxsize=8)
def _date(when: datetime) -> str:
    """RFC 5322's date of ``when``, whole seconds (messages of one second share it)."""
    return format_datetime(when)
