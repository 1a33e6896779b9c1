"""Abuse reports in the Abuse Reporting Format (RFC 5965), built but not sent.

The report is ``multipart/report; report-type=feedback-report`` with three parts: a note for
people, the machine-readable ``message/feedback-report`` fields, and the reported message.

The stdlib email package would rebuild a message/* part from a parsed Message, re-folding and
possibly re-encoding the original, and its BytesGenerator cannot write a raw 8-bit payload for a
message/* part. So the email package builds the report's headers and the text part, and the
multipart body is joined here by hand, with the feedback fields and the original byte for byte.
Parsed back with ``email.policy.default``, both message/* parts read as sub-messages whose
headers are the fields.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from email import policy as email_policy
from email.message import EmailMessage, MIMEPart
from email.utils import format_datetime, make_msgid

from scoring.address import a_label_mailbox
from worker.mail import set_to

_POLICY = email_policy.SMTP  # CRLF line endings
_LINE_BREAKS = re.compile(r"[\r\n]+[ \t]*")


def build_abuse_report(
    *,
    original: bytes,
    reporter: str,
    to: str,
    mail_from: str,
    rcpt_tos: list[str],
    arrival: datetime,
    source_ip: str | None,
    reported_domain: str,
    auth_results: str | None,
    reason: str,
    user_agent: str = "OutboundGuard/1.0",
    max_original: int = 100_000,
    date: datetime | None = None,
) -> bytes:
    """Return the complete report message (CRLF line endings), ready to hand to SMTP.

    ``arrival`` and ``date`` (the report's own Date, default now) are treated as UTC when
    naive. Above ``max_original`` bytes only the original's header block is included.
    """
    original = _crlf(original)
    arrival_date = format_datetime(_aware(arrival))
    whole = len(original) <= max_original

    note = MIMEPart(policy=_POLICY)
    note.set_content(
        _human_text(
            mail_from=mail_from,
            rcpt_tos=rcpt_tos,
            arrival_date=arrival_date,
            source_ip=source_ip,
            reported_domain=reported_domain,
            reason=reason,
            whole=whole,
        )
    )

    fields = [
        ("Feedback-Type", "abuse"),
        ("User-Agent", user_agent),
        ("Version", "1"),
        # Domains in A-label form, as in the envelope the next hop was given (RFC 5965 3.5
        # fields are SMTP paths); an ASCII report cannot carry a U-label.
        ("Original-Mail-From", f"<{a_label_mailbox(mail_from) if mail_from else ''}>"),
        *[("Original-Rcpt-To", f"<{a_label_mailbox(rcpt)}>") for rcpt in rcpt_tos],
        ("Arrival-Date", arrival_date),
    ]
    if source_ip:
        fields.append(("Source-IP", source_ip))
    fields.append(("Reported-Domain", reported_domain))
    if auth_results:
        fields.append(("Authentication-Results", auth_results))
    block = "".join(f"{name}: {_one_line(value)}\r\n" for name, value in fields)

    parts = [
        note.as_bytes(policy=_POLICY),
        _raw_part("message/feedback-report", block.encode("utf-8")),
        _raw_part("message/rfc822", original)
        if whole
        else _raw_part("text/rfc822-headers", _header_block(original, max_original)),
    ]
    boundary = _boundary_for(parts)

    head = EmailMessage(policy=_POLICY)
    head["From"] = reporter
    set_to(head, a_label_mailbox(to))  # a stored address must not write headers of its own
    head["Subject"] = _one_line(f"Abuse report: mail from {reported_domain}")
    head["Date"] = format_datetime(_aware(date or datetime.now(UTC)))
    head["Message-ID"] = make_msgid(domain=_domain_of(reporter))
    head["MIME-Version"] = "1.0"
    head["Content-Type"] = (
        f'multipart/report; report-type=feedback-report; boundary="{boundary}"'
    )
    head.set_payload("")

    delimiter = b"--" + boundary.encode("ascii")
    body = b"".join(delimiter + b"\r\n" + part + b"\r\n" for part in parts)
    return head.as_bytes(policy=_POLICY) + body + delimiter + b"--\r\n"


def _raw_part(content_type: str, data: bytes) -> bytes:
    """A body part carrying ``data`` exactly as given."""
    encoding = "7bit" if data.isascii() else "8bit"
    return (
        f"Content-Type: {content_type}\r\n"
        "Content-Disposition: inline\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode("ascii") + data


def _boundary_for(parts: list[bytes]) -> str:
    """A boundary that occurs in no part, as RFC 2046 requires."""
    while True:
        boundary = f"=_arf_{secrets.token_hex(12)}"
        if not any(boundary.encode("ascii") in part for part in parts):
            return boundary


def _human_text(
    *,
    mail_from: str,
    rcpt_tos: list[str],
    arrival_date: str,
    source_ip: str | None,
    reported_domain: str,
    reason: str,
    whole: bool,
) -> str:
    lines = [
        "This is an abuse report for a message that passed through our outgoing mail",
        f"service on behalf of {reported_domain}.",
        "",
        f"Reason: {reason}",
        "",
        f"Envelope sender: <{mail_from}>",
        f"Recipients: {', '.join(f'<{r}>' for r in rcpt_tos) or '(none)'}",
        f"Received at: {arrival_date}",
    ]
    if source_ip:
        lines.append(f"Submitted from: {source_ip}")
    lines += [
        "",
        "The machine-readable report follows (RFC 5965), then the "
        + ("original message." if whole else "headers of the original message, which was too "
           "large to include."),
    ]
    return "\n".join(lines) + "\n"


_FIELD_LINE = re.compile(rb"[!-9;-~]+[ \t]*:|[ \t]")


def _header_block(message: bytes, limit: int) -> bytes:
    """The original's header block: its lines up to the first that is no header field (the
    blank line, or body text in a message that has no blank line), at most ``limit`` bytes
    of whole lines. A message too large to include must not come back whole as "headers"."""
    block = []
    size = 0
    for line in message.split(b"\r\n"):
        if not _FIELD_LINE.match(line) or size + len(line) + 2 > limit:
            break
        block.append(line + b"\r\n")
        size += len(line) + 2
    return b"".join(block)


def _crlf(data: bytes) -> bytes:
    """Every line ending as CRLF, whatever mix arrived."""
    return re.sub(rb"\r?\n|\r", b"\r\n", data)


def _one_line(value: str) -> str:
    """Unfold a value so it cannot add header lines to the report."""
    return _LINE_BREAKS.sub(" ", value).strip()


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _domain_of(address: str) -> str | None:
    match = re.search(r"@([^\s>@]+)>?\s*$", address)
    return match.group(1) if match else None
