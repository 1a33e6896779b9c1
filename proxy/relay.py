"""Hand a message to the next hop with aiosmtplib and report exactly what it said."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiosmtplib


@dataclass(frozen=True)
class RelayResult:
    delivered: bool
    reply: str
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


async def relay(*, host: str, port: int, mail_from: str, rcpt_tos: list[str], data: bytes,
                timeout: float, local_hostname: str | None = None) -> RelayResult:
    """Deliver to the next hop; ``delivered`` only when it took the message for someone."""
    from scoring import outcomes

    try:
        errors, response = await aiosmtplib.send(
            data, sender=mail_from, recipients=rcpt_tos, hostname=host, port=port,
            timeout=timeout, local_hostname=local_hostname, validate_certs=False,
        )
    except aiosmtplib.SMTPRecipientsRefused as exc:
        first = exc.recipients[0]
        return RelayResult(False, outcomes.next_hop_refused(first.code, first.message),
                           {r.recipient: (r.code, r.message) for r in exc.recipients})
    except aiosmtplib.SMTPResponseException as exc:
        return RelayResult(False, outcomes.next_hop_refused(exc.code, exc.message))
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        return RelayResult(False, outcomes.NEXT_HOP_DOWN)
    refused = {rcpt: (resp.code, resp.message) for rcpt, resp in errors.items()}
    return RelayResult(True, f"250 2.0.0 Accepted by next hop: {response}"[:400], refused)
