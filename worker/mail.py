"""Send the worker's own mail (notices, alerts, reports) through the same next hop."""

from __future__ import annotations

import email.policy
import smtplib
from email.message import EmailMessage
from email.utils import formatdate, make_msgid


def compose(*, sender: str, to: str, subject: str, body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(body)
    return msg


def send(config: dict, message: EmailMessage | bytes, *, sender: str, to: list[str]) -> None:
    """Raises on any failure, so RQ retries the job."""
    host, _, port = config["UPSTREAM_SMTP"].rpartition(":")
    # CRLF line endings: smtplib sends bytes as given, and SMTP lines end in CRLF.
    data = (message.as_bytes(policy=email.policy.SMTP) if isinstance(message, EmailMessage)
            else message)
    with smtplib.SMTP(host.strip("[]"), int(port), timeout=config["UPSTREAM_TIMEOUT"]) as smtp:
        smtp.ehlo(config["SMTP_HOSTNAME"])
        if smtp.has_extn("starttls"):
            smtp.starttls()
            smtp.ehlo(config["SMTP_HOSTNAME"])
        smtp.sendmail(sender, to, data)
