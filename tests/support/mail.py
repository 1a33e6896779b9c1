"""Building messages and talking SMTP to the proxy, as a customer's server would."""

from __future__ import annotations

import email.policy
import smtplib
import ssl
from email.message import EmailMessage

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(sender="alice@example.com", to="bob@example.org", subject="Hello",
            body="Just saying hello.\n", **headers) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Sun, 29 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = "<test@example.com>"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg.as_bytes(policy=email.policy.SMTP)


def client(port: int, *, starttls: bool = True, host: str = "127.0.0.1",
           source: str | None = None) -> smtplib.SMTP:
    """An SMTP client; ``source`` binds it to another local address (any 127.x.y.z works on
    Linux), so one machine can play several customers' servers."""
    smtp = smtplib.SMTP(host, port, timeout=15,
                        source_address=(source, 0) if source else None)
    smtp.ehlo("client.example.com")
    if starttls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        smtp.starttls(context=context)
        smtp.ehlo("client.example.com")
    return smtp


def send(smtp: smtplib.SMTP, data: bytes, sender="alice@example.com",
         rcpts=("bob@example.org",)) -> tuple[int, bytes]:
    """MAIL, RCPT, DATA by hand, returning the final reply instead of raising."""
    code, reply = smtp.mail(sender)
    if code != 250:
        smtp.rset()
        return code, reply
    for rcpt in rcpts:
        code, reply = smtp.rcpt(rcpt)
        if code not in (250, 251):
            smtp.rset()
            return code, reply
    return smtp.data(data)


def read_reply(file) -> tuple[int, bytes]:
    """One (possibly multi-line) SMTP reply from a socket's file: (code, all its lines), or
    (-1, what came) when the server closed the connection."""
    lines = []
    while True:
        line = file.readline()
        if not line:
            return -1, b"".join(lines)
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), b"".join(lines)
