"""Message archiving for senders: a copy of every relayed message, filed under the outgoing
user's domain, searchable in the control panel.

Under the user's domain, not the envelope sender's: a customer writes any MAIL FROM it likes,
and filing by it would let one customer put its mail into another customer's archive (and hide
it from its own). Only a shared smarthost, the provider's own relay for every customer (a
setting only super admins set), files each copy under the envelope sender's domain when that
domain is one of ours: that relay's mail belongs to the domains it sends for.

The copy is made after the next hop accepted the message (so nothing unsent is archived), of
the bytes as relayed (identity headers removed, DKIM signature added).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, select

from outgoing.models import ArchivedMessage, Domain, utcnow
from outgoing.quarantine import purge_older_than, stored_text
from outgoing.storage import commit_with_bodies

AREA = "archive"


@dataclass(frozen=True)
class ToArchive:
    """One relayed message for the archive."""

    domain_id: int  # the outgoing user's domain
    user_id: int | None
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    subject: str
    received_at: datetime | None = None
    by_sender: bool = False  # a shared smarthost's copy: under the sender's domain if ours


def _domain_name(mail_from: str) -> str:
    return (mail_from or "").rpartition("@")[2].strip().strip(">").rstrip(".").lower()


def archive_domain_ids(session, messages: list[ToArchive]) -> list[int]:
    """The domain whose archive gets each copy, in one query: the user's own, or for a shared
    smarthost's copy (``by_sender``) the envelope sender's domain when it is one of ours."""
    names = {_domain_name(m.mail_from) for m in messages if m.by_sender} - {""}
    found = dict(session.execute(select(Domain.name, Domain.id)
                                 .where(Domain.name.in_(sorted(names)))).all()) if names else {}
    return [found.get(_domain_name(m.mail_from), m.domain_id) if m.by_sender else m.domain_id
            for m in messages]


def archive_message(session, store, *, domain_id: int, user_id: int | None, mail_from: str,
                    rcpt_tos: list[str], data: bytes, subject: str,
                    received_at: datetime | None = None,
                    by_sender: bool = False) -> ArchivedMessage:
    return archive_messages(session, store, [ToArchive(
        domain_id=domain_id, user_id=user_id, mail_from=mail_from, rcpt_tos=rcpt_tos,
        data=data, subject=subject, received_at=received_at, by_sender=by_sender)])[0]


def archive_messages(session, store, messages: list[ToArchive]) -> list[ArchivedMessage]:
    """File every message, committed in one transaction: the bodies are durable first, and
    a failure leaves none of the rows, so the caller can retry each on its own."""
    domains = archive_domain_ids(session, messages)
    rows = [ArchivedMessage(
        domain_id=domain_id, user_id=m.user_id, mail_from=m.mail_from[:320],
        rcpt_tos=json.dumps(list(m.rcpt_tos), ensure_ascii=False),
        subject=stored_text(m.subject or "", 500), size=len(m.data),
        received_at=m.received_at or utcnow(),
    ) for m, domain_id in zip(messages, domains, strict=True)]
    store.attach_many([(row, m.data) for row, m in zip(rows, messages, strict=True)], AREA)
    session.add_all(rows)
    commit_with_bodies(session, store, rows)
    return rows


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
