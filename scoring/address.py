"""The canonical spelling of a mailbox, for comparing addresses and keying them.

RFC 5321 §4.1.2: a quoted-string local part that could be written as a dot-string names the
same mailbox, and the next hop (Postfix, aiosmtpd) reads ``"locked"@a.test`` and
``"lock\\ed"@a.test`` as ``locked@a.test``. A lock or a look-up keyed on the spelling the
client chose would miss them, so checks use this form; the address relayed stays the one the
client sent. A quoted local part that is not a dot-string (``"a b"``) is another mailbox and
keeps its quotes, with only ``\\`` and ``"`` escaped inside them.

The domain is the one DNS resolves: ``bob@bücher.example``, ``bob@BÜCHER.example``, a
full-width ``ａ`` and ``bob@xn--bcher-kva.example`` are one mailbox, spelled in the A-label
form, as the control panel spells domain names (``outgoing.users.normalise_domain``).
"""

from __future__ import annotations

import re

import idna

# RFC 5321 atext, with RFC 6531's UTF-8 (no C1 controls, no lone surrogates).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u00a0-\ud7ff\ue000-\U0010ffff-]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"@', re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def split_mailbox(address: str) -> tuple[str, str] | None:
    """(local part as written, domain) of ``local@domain`` whose local part is a dot-string
    or a quoted-string; None for anything else (``<>``, a customer id, header garbage)."""
    if address.startswith('"'):
        match = _QUOTED.match(address)
        if match is None:
            return None
        local, domain = address[:match.end() - 1], address[match.end():]
    else:
        local, at, domain = address.partition("@")
        if not at or not _DOT_STRING.fullmatch(local):
            return None
    return (local, domain) if domain else None


def canonical_local_part(local: str) -> str:
    """A quoted local part without needless quoting: unquoted when that is a dot-string,
    else quoted again with the fewest escapes."""
    if not local.startswith('"'):
        return local
    text = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    if _DOT_STRING.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def a_label_domain(domain: str) -> str:
    """The A-label (ASCII) form of a domain with non-ASCII characters, the one every part of
    the product stores and compares: IDNA 2008 with UTS #46's non-transitional mapping (case
    folded, full-width letters mapped), as registries and browsers resolve it, so
    ``straße.de`` is ``xn--strae-oqa.de``, a domain of its own, and not ``strasse.de``, which
    may be another customer's (IDNA 2003, Python's codec, folded one into the other). A name
    IDNA 2008 refuses (a symbol, a zero-width character out of context) gets IDNA 2003's
    form, as before, so spelling a domain with a zero-width character still names the same
    domain. Raises UnicodeError when neither takes it."""
    try:
        return idna.encode(domain, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return domain.encode("idna").decode("ascii")


def canonical_domain(domain: str) -> str:
    """A domain with non-ASCII characters in its A-label form (``a_label_domain``); an ASCII
    one, or one that is no valid IDN, as it is. Without this a locked identity came back as
    another by spelling its domain the other way."""
    if domain.isascii():
        return domain
    try:
        return a_label_domain(domain)
    except UnicodeError:
        return domain


def canonical_mailbox(address: str) -> str:
    """``address`` with its local part in canonical form and its domain in A-label form;
    anything that is not a mailbox is returned as it is. ASCII case is left alone (callers
    lower-case what they compare)."""
    parts = split_mailbox(address)
    if parts is None:
        return address
    local, domain = parts
    return f"{canonical_local_part(local)}@{canonical_domain(domain)}"


def mailbox_domain(address: str) -> str:
    """The domain of a mailbox (after the local part, which may hold "@" when quoted),
    lower-cased; "" when ``address`` is not a mailbox."""
    parts = split_mailbox(address)
    return parts[1].lower() if parts else ""


def a_label_mailbox(address: str) -> str:
    """``address`` as SMTP and headers carry it without SMTPUTF8: its domain in A-label form,
    its local part as written (that part is the receiving side's to read). Anything that is
    not a mailbox is returned as it is. A domain is only ever a name for DNS, so a
    non-ASCII one need not make a message need SMTPUTF8, which many next hops lack."""
    parts = split_mailbox(address)
    if parts is None:
        return address
    local, domain = parts
    return f"{local}@{canonical_domain(domain)}"
