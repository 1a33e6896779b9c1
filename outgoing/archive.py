"""Message archiving for senders: a copy of every relayed message, filed under the envelope
sender's domain, searchable in the control panel.

The copy is made after the next hop accepted the message (so nothing unsent is archived), of
the bytes as relayed (identity headers removed, DKIM signature added).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, select

from outgoing.models import ArchivedMessage, Domain, utcnow
from outgoing.quarantine import purge_older_than

AREA = "archive"


def sender_domain_id(session, mail_from: str, fallback_domain_id: int) -> int:
    """The domain whose archive gets the copy: the envelope sender's domain when it is one of
    ours, else the outgoing user's own domain."""
    name = (mail_from or "").rpartition("@")[2].strip().strip(">").rstrip(".").lower()
    if name:
        found = session.scalar(select(Domain.id).where(Domain.name == name))
        if found is not None:
            return found
    return fallback_domain_id


def archive_message(session, store, *, domain_id: int, user_id: int | None, mail_from: str,
                    rcpt_tos: list[str], data: bytes, subject: str,
                    received_at: datetime | None = None) -> ArchivedMessage:
    row = ArchivedMessage(
        domain_id=sender_domain_id(session, mail_from, domain_id), user_id=user_id,
        mail_from=mail_from[:320], rcpt_tos=json.dumps(list(rcpt_tos), ensure_ascii=False),
        subject=(subject or "")[:500], size=len(data), received_at=received_at or utcnow(),
    )
    store.attach(row, data, AREA)
    session.add(row)
    try:
        session.commit()
    except BaseException:
        store.discard(row.storage_key)
        raise
    return row


@dataclass(frozen=True)
class ArchiveSearch:
    """What the archive page filters by; empty fields do not filter."""

    sender: str = ""
    recipient: str = ""
    subject: str = ""
    date_from: datetime | None = None
    date_to: datetime | None = None  # exclusive


def search_query(criteria: ArchiveSearch) -> Select:
    """Newest first. Sender and recipient match a part of the address, case-insensitively
    (recipients are a JSON list, so the match is on its text)."""
    query = select(ArchivedMessage).order_by(ArchivedMessage.received_at.desc(),
                                             ArchivedMessage.id.desc())
    if criteria.sender:
        query = query.where(ArchivedMessage.mail_from.icontains(criteria.sender,
                                                                autoescape=True))
    if criteria.recipient:
        query = query.where(ArchivedMessage.rcpt_tos.icontains(criteria.recipient,
                                                               autoescape=True))
    if criteria.subject:
        query = query.where(ArchivedMessage.subject.icontains(criteria.subject,
                                                              autoescape=True))
    if criteria.date_from is not None:
        query = query.where(ArchivedMessage.received_at >= criteria.date_from)
    if criteria.date_to is not None:
        query = query.where(ArchivedMessage.received_at < criteria.date_to)
    return query


def expire_archive(session, config: dict, now: datetime | None = None) -> int:
    """Enforce ``ARCHIVE_RETENTION_DAYS`` (0, the default, keeps the archive forever)."""
    days = int(config.get("ARCHIVE_RETENTION_DAYS") or 0)
    if days <= 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=days)
    return purge_older_than(session, config, ArchivedMessage, cutoff)
