"""Send the worker's own mail (notices, alerts, reports) through the same next hop."""

from __future__ import annotations

import email.policy
import re
import smtplib
from email.header import Header
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from scoring.address import a_label_mailbox
from worker import claims

SENT_MARKER_SECONDS = 14 * 86400


def _path(address: str) -> str:
    return "<>" if address in ("", "<>") else f"<{address}>"


class ExactSMTP(smtplib.SMTP):
    """smtplib's SMTP, sending each MAIL/RCPT path exactly as given: its own ``mail()`` and
    ``rcpt()`` re-parse the address (``quoteaddr``: ``email.utils.parseaddr``), which rewrites
    quoted local parts, so the next hop would get another address than the proxy checked."""

    def mail(self, sender, options=()):
        if any(option.lower() == "smtputf8" for option in options):
            if not self.has_extn("smtputf8"):
                raise smtplib.SMTPNotSupportedError("SMTPUTF8 not supported by server")
            self.command_encoding = "utf-8"
        params = " " + " ".join(options) if options and self.does_esmtp else ""
        self.putcmd("mail", f"FROM:{_path(sender)}{params}")
        return self.getreply()

    def rcpt(self, recip, options=()):
        params = " " + " ".join(options) if options and self.does_esmtp else ""
        self.putcmd("rcpt", f"TO:{_path(recip)}{params}")
        return self.getreply()

    def sendmail(self, from_addr, to_addrs, msg, mail_options=(), rcpt_options=()):
        """8-bit data is announced (BODY=8BITMIME, RFC 6152) where the server offers it, as
        the proxy's relay does: smtplib does not, and a message/rfc822 part (an abuse
        report's) or a released message cannot be taken down to 7 bits on the way."""
        options = list(mail_options)
        self.ehlo_or_helo_if_needed()
        if isinstance(msg, bytes) and not msg.isascii() and self.has_extn("8bitmime") \
                and not any(option.upper().startswith("BODY=") for option in options):
            options.append("BODY=8BITMIME")
        return super().sendmail(from_addr, to_addrs, msg, options, rcpt_options)


class MailRefused(Exception):
    """The next hop refused the message for good (5xx): sending it again cannot help."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def one_line(value: str) -> str:
    """``value`` on one line: control characters and runs of white space are one space."""
    return " ".join(_CONTROL.sub(" ", str(value)).split())


def set_to(msg: EmailMessage, to: str) -> None:
    """The To header, naming ``to`` exactly or not at all: the email package reads "=?...?="
    in an address as an encoded word, so an address a customer chose (an identity such as
    ``=?utf-8?q?a=0D=0A...?=@their.domain``) would crash the job, or name another address.
    The envelope, not this header, decides where the message goes."""
    try:
        msg["To"] = to
        header = msg["To"]
        if len(header.addresses) == 1 and header.addresses[0].addr_spec == to:
            return
    except (ValueError, IndexError, TypeError):
        pass
    del msg["To"]
    msg["To"] = "undisclosed-recipients:;"


def _set_subject(msg: EmailMessage, subject: str) -> None:
    """The Subject as given, on one line. The email package decodes "=?...?=" in a value it
    is handed, which would put what the encoded word holds (CR LF, a whole header block)
    into the header: such a subject is stored encoded, so it reads back as the text it
    was."""
    text = one_line(subject)
    if "=?" in text:
        msg.set_raw("Subject", Header(text, "utf-8", header_name="Subject").encode(
            maxlinelen=76))
    else:
        msg["Subject"] = text


def compose(*, sender: str, to: str, subject: str, body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    set_to(msg, a_label_mailbox(to))
    _set_subject(msg, subject)
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(body)
    return msg


def send(config: dict, message: EmailMessage | bytes, *, sender: str, to: list[str]) -> None:
    """Raise MailRefused on a permanent refusal, anything else on a transient failure (so
    RQ retries the job).

    Domains go out in A-label form; SMTPUTF8 is asked for only when a local part is not
    ASCII, the one thing no A-label can spell."""
    host, _, port = config["UPSTREAM_SMTP"].rpartition(":")
    sender, to = a_label_mailbox(sender), [a_label_mailbox(rcpt) for rcpt in to]
    utf8 = not all(address.isascii() for address in [sender, *to])
    # CRLF line endings: smtplib sends bytes as given, and SMTP lines end in CRLF.
    data = (message.as_bytes(policy=email.policy.SMTPUTF8 if utf8 else email.policy.SMTP)
            if isinstance(message, EmailMessage) else message)
    try:
        with ExactSMTP(host.strip("[]"), int(port),
                       timeout=config["UPSTREAM_TIMEOUT"]) as smtp:
            smtp.ehlo(config["SMTP_HOSTNAME"])
            if smtp.has_extn("starttls"):
                smtp.starttls()
                smtp.ehlo(config["SMTP_HOSTNAME"])
            if config.get("UPSTREAM_USERNAME") and smtp.has_extn("auth"):
                smtp.login(config["UPSTREAM_USERNAME"], config.get("UPSTREAM_PASSWORD") or "")
            smtp.sendmail(sender, to, data, mail_options=["SMTPUTF8"] if utf8 else [])
    except smtplib.SMTPNotSupportedError as exc:
        raise MailRefused(f"{', '.join(to)} needs SMTPUTF8, which the next hop lacks") from exc
    except smtplib.SMTPRecipientsRefused as exc:
        if all(code >= 500 for code, _ in exc.recipients.values()):
            raise MailRefused(f"{', '.join(to)} refused: {exc.recipients}") from exc
        raise
    except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
        if exc.smtp_code >= 500:
            raise MailRefused(f"refused with {exc.smtp_code} {exc.smtp_error!r}") from exc
        raise


def _sent_key(marker: str) -> str:
    return f"og:sent:{marker}"


SENT = "sent"
# "1" is what a marker held before markers named their job: the mail went out then.
_SENT_VALUES = frozenset({SENT, "1"})


def was_sent(redis, marker: str) -> bool:
    """Whether ``send_once`` has sent the mail of ``marker``, or another job at work is
    sending it. A claim left by a job that has ended (killed mid-send) is neither: its mail
    went nowhere, and the caller must go on to ``send_once``, which takes the claim over."""
    holder = claims.holder_of(redis, _sent_key(marker))
    if holder is None:
        return False
    if holder in _SENT_VALUES:
        return True
    return holder != claims.current_job_id() and claims.at_work(redis, holder)


def send_once(config: dict, redis, marker: str, message: EmailMessage | bytes, *,
              sender: str, to: list[str]) -> bool:
    """Send unless ``marker`` says it was sent already, or is being sent by a job at work;
    True when sent now.

    The marker is a claim naming this job (:mod:`worker.claims`) while the mail is on its
    way, and becomes "sent" only once the next hop has taken it: a worker killed mid-send
    leaves a claim that RQ's retry, or the next job once this one has ended, takes over
    and sends, rather than a marker that says sent for mail that never went. A refusal or
    failure gives the claim back. (A kill between the next hop's 250 and "sent" is the one
    case left where a retry mails twice.)
    """
    key = _sent_key(marker)
    if not claims.claim(redis, key, seconds=SENT_MARKER_SECONDS, final=_SENT_VALUES):
        return False
    try:
        send(config, message, sender=sender, to=to)
    except BaseException:
        claims.give_back(redis, key)
        raise
    redis.set(key, SENT, ex=SENT_MARKER_SECONDS)
    return True
