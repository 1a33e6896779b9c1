"""The incident pack of a locked (or suspect) outgoing user or identity: what it sent in the
last 24 hours, from the message log, in one place. The worker puts it into the lock alert;
the panel offers it as a .zip (``summary.json`` plus sample messages as .eml).

Every query is scoped to the one user (or identity) *and* its domain, so nothing of another
domain enters a pack, even when two customers share recipients or client addresses, and
every query is bounded: the counts are one aggregate over the window, the lists summarise the
newest ``SCAN_ROWS`` rows, the samples are at most ``MAX_MESSAGES`` messages and
``MAX_BYTES`` bytes.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlencode

from sqlalchemy import func, select

from outgoing import message_log
from outgoing.locks import kind_of, owner_of, triggering_spam
from outgoing.models import (
    LOCK_AUTOMATIC,
    ArchivedMessage,
    AuditEvent,
    HeldMessage,
    Identity,
    MessageLogEntry,
    OutgoingUser,
    QuarantinedMessage,
)
from outgoing.storage import StorageError, read_body
from scoring import incident as summaries

WINDOW = timedelta(hours=24)
SCAN_ROWS = 5000  # newest log rows the lists (domains, subjects, addresses) are made from
MAX_MESSAGES = 20  # sample messages in the .zip
MAX_BYTES = 10 * 1024 * 1024  # their total size, before compression
# Where the panel serves the .zip (webapp/incident.py mounts these; the alert links to them).
PACK_PATHS = {"user": "/outgoing/users/{id}/incident-pack",
              "identity": "/outgoing/identities/{id}/incident-pack"}
LOG_SEARCH_TIME = "%Y-%m-%dT%H:%M"


@dataclass
class LockFacts:
    locked: bool
    kind: str | None = None
    reason: str | None = None
    locked_at: datetime | None = None
    by: str | None = None
    trigger: str = ""
    spam_before_lock: int = 0  # quarantined in the spam window before the lock (log)


@dataclass
class Pack:
    kind: str  # "user" | "identity"
    target_id: int
    user_id: int
    user: str
    identity: str | None
    domain_id: int
    domain: str
    since: datetime
    generated_at: datetime
    lock: LockFacts
    counts: summaries.Counts
    first_at: datetime | None
    last_at: datetime | None
    summary: summaries.Summary
    scanned_rows: int
    log_search_url: str
    download_url: str
    samples: list[dict] = field(default_factory=list)  # filled in by ``zip_pack``
    omitted: list[dict] = field(default_factory=list)

    @property
    def who(self) -> str:
        return f"identity {self.identity} of {self.user}" if self.identity else self.user


def _scoped(query, target: OutgoingUser | Identity):
    """The log rows of exactly this user (or identity), in its domain."""
    owner = owner_of(target)
    entry = MessageLogEntry
    query = query.where(entry.user_id == owner.id, entry.domain_id == owner.domain_id)
    if isinstance(target, Identity):
        query = query.where(entry.identity == target.value)
    return query


def log_search_url(public_url: str, user: str, identity: str | None, since: datetime,
                   until: datetime) -> str:
    """Log Search filtered to the sender and the pack's time range (whole minutes: a "to"
    minute takes in that whole minute, so the newest transaction is inside)."""
    end = until.replace(second=0, microsecond=0)
    args = {"user": user}
    if identity:
        args["identity"] = identity
    args["from"] = since.strftime(LOG_SEARCH_TIME)
    args["to"] = end.strftime(LOG_SEARCH_TIME)
    return f"{public_url.rstrip('/')}{message_log.SEARCH_PATH}?{urlencode(args)}"


def download_url(public_url: str, target: OutgoingUser | Identity) -> str:
    return public_url.rstrip("/") + PACK_PATHS[kind_of(target)].format(id=target.id)


def _locked_by(session, target) -> str | None:
    """Who set the current lock, from its audit event (the proxy records ``proxy``)."""
    if not target.locked:
        return None
    event = AuditEvent
    rows = session.scalars(
        select(event).where(event.action == "lock", event.target_type == kind_of(target),
                            event.target_id == target.id,
                            event.domain_id == owner_of(target).domain_id)
        .order_by(event.at.desc(), event.id.desc()).limit(5))
    for row in rows:
        try:
            detail = json.loads(row.detail or "{}")
        except ValueError:
            continue
        if detail.get("lock_id") == target.lock_id:
            return row.actor
    return None


def _lock_facts(session, target, spam_window_seconds: int) -> LockFacts:
    if not target.locked:
        return LockFacts(locked=False, trigger="Not locked")
    by = _locked_by(session, target)
    spam = 0
    if target.locked_at is not None:
        entry = MessageLogEntry
        spam = session.scalar(_scoped(select(func.count()).select_from(entry), target).where(
            entry.verdict == summaries.SPAM_VERDICT,
            entry.at >= target.locked_at - timedelta(seconds=spam_window_seconds),
            entry.at <= target.locked_at + timedelta(seconds=60))) or 0
    return LockFacts(locked=True, kind=target.lock_kind, reason=target.lock_reason,
                     locked_at=target.locked_at, by=by,
                     trigger=summaries.trigger(target.lock_reason, target.lock_kind, by),
                     spam_before_lock=spam)


def build(session, target: OutgoingUser | Identity, *, now: datetime, public_url: str,
          spam_window_seconds: int) -> Pack:
    """The pack of ``target`` for the 24 hours before ``now`` (naive UTC)."""
    owner = owner_of(target)
    since = now - WINDOW
    entry = MessageLogEntry
    by_verdict: dict[str, tuple[int, int, int]] = {}
    first = last = None
    aggregate = _scoped(select(entry.verdict, func.count(), func.sum(entry.rcpt_count),
                               func.sum(entry.refused_count), func.min(entry.at),
                               func.max(entry.at)), target).where(entry.at >= since)
    for verdict, count, rcpts, refused, low, high in session.execute(
            aggregate.group_by(entry.verdict)):
        by_verdict[verdict] = (int(count), int(rcpts or 0), int(refused or 0))
        first = low if first is None or low < first else first
        last = high if last is None or high > last else last
    newest = session.execute(_scoped(
        select(entry.at, entry.verdict, entry.client_ip, entry.login, entry.subject,
               entry.recipients), target).where(entry.at >= since)
        .order_by(entry.at.desc(), entry.id.desc()).limit(SCAN_ROWS)).all()
    rows = [summaries.LogRow(at=r.at, verdict=r.verdict, client_ip=r.client_ip,
                             login=r.login, subject=r.subject,
                             recipients=tuple((r.recipients or "").split("\n"))
                             if r.recipients else ()) for r in newest]
    identity = target.value if isinstance(target, Identity) else None
    return Pack(
        kind=kind_of(target), target_id=target.id, user_id=owner.id, user=owner.name,
        identity=identity, domain_id=owner.domain_id, domain=owner.domain.name,
        since=since, generated_at=now,
        lock=_lock_facts(session, target, spam_window_seconds),
        counts=summaries.counts(by_verdict), first_at=first, last_at=last,
        summary=summaries.summarise(rows), scanned_rows=len(rows),
        log_search_url=log_search_url(public_url, owner.name, identity, since, now),
        download_url=download_url(public_url, target))


def trigger_logged(session, target: OutgoingUser | Identity, *,
                   spam_window_seconds: int) -> bool:
    """Whether the message log already holds the transaction that set off ``target``'s
    automatic spam lock (the proxy appends it just after its reply, which comes after the
    lock). True when there is nothing to wait for: no such lock, no quarantined message, or
    a sender the log has no rows of at all (the log is not running)."""
    if not target.locked or target.lock_kind != LOCK_AUTOMATIC or target.locked_at is None:
        return True
    spam = triggering_spam(session, target, window_seconds=spam_window_seconds, limit=1)
    if not spam:
        return True
    entry = MessageLogEntry
    recent = _scoped(select(entry.id), target).where(
        entry.at >= target.locked_at - timedelta(seconds=spam_window_seconds + 300))
    if session.scalar(recent.where(entry.stored_kind == "quarantine",
                                   entry.stored_id == spam[0].id).limit(1)) is not None:
        return True
    return session.scalar(recent.limit(1)) is None


# --- the .zip ----------------------------------------------------------------------------

def sample_rows(session, target: OutgoingUser | Identity, since: datetime,
                limit: int = MAX_MESSAGES) -> list[tuple[str, object]]:
    """Stored messages of ``target`` since ``since``: quarantined first (what the lock is
    about), then held, then archived; each newest first; only the target's own domain."""
    owner = owner_of(target)
    identity = target.value if isinstance(target, Identity) else None
    found: list[tuple[str, object]] = []
    for store, model in (("quarantine", QuarantinedMessage), ("held", HeldMessage)):
        query = select(model).where(model.user_id == owner.id,
                                    model.domain_id == owner.domain_id,
                                    model.received_at >= since)
        if identity is not None:
            query = query.where(model.identity == identity)
        found += [(store, row) for row in session.scalars(
            query.order_by(model.received_at.desc(), model.id.desc()).limit(limit))]
    archived = select(ArchivedMessage).where(ArchivedMessage.user_id == owner.id,
                                             ArchivedMessage.domain_id == owner.domain_id,
                                             ArchivedMessage.received_at >= since)
    if identity is not None:
        # The archive keeps no identity; the log says which archived copies were this one's.
        entry = MessageLogEntry
        ids = _scoped(select(entry.stored_id), target).where(
            entry.at >= since, entry.stored_kind == "archive",
            entry.stored_id.is_not(None)).order_by(entry.at.desc()).limit(limit)
        archived = archived.where(ArchivedMessage.id.in_(ids))
    found += [("archive", row) for row in session.scalars(
        archived.order_by(ArchivedMessage.received_at.desc(), ArchivedMessage.id.desc())
        .limit(limit))]
    return found


def _described(store: str, row) -> dict:
    return {"store": store, "id": row.id, "received_at": row.received_at,
            "mail_from": row.mail_from, "subject": row.subject, "size": row.size}


def zip_pack(session, config: dict, target: OutgoingUser | Identity, pack: Pack, *,
             max_messages: int = MAX_MESSAGES, max_bytes: int = MAX_BYTES) -> bytes:
    """``summary.json`` and up to ``max_messages`` stored messages (``messages/*.eml``)
    whose sizes add up to at most ``max_bytes``; what did not fit is listed as omitted."""
    files: list[tuple[str, bytes]] = []
    total = 0
    pack.samples, pack.omitted = [], []
    for store, row in sample_rows(session, target, pack.since, max_messages):
        described = _described(store, row)
        if len(files) >= max_messages:
            pack.omitted.append(dict(described, why="more than the message limit"))
            continue
        if total + (row.size or 0) > max_bytes:
            pack.omitted.append(dict(described, why="over the size limit"))
            continue
        try:
            data = read_body(config, row)
        except StorageError:
            pack.omitted.append(dict(described, why="the stored body cannot be read"))
            continue
        if total + len(data) > max_bytes:
            pack.omitted.append(dict(described, why="over the size limit"))
            continue
        total += len(data)
        name = f"messages/{len(files) + 1:02d}-{store}-{row.id}.eml"
        files.append((name, data))
        pack.samples.append(dict(described, file=name))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("summary.json", json.dumps(as_json(pack, max_messages=max_messages,
                                                            max_bytes=max_bytes),
                                                    indent=2, default=_json_value))
        for name, data in files:
            archive.writestr(name, data)
    return buffer.getvalue()


def _json_value(value):
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds") + "Z"
    raise TypeError(f"not JSON: {type(value).__name__}")


def as_json(pack: Pack, *, max_messages: int = MAX_MESSAGES,
            max_bytes: int = MAX_BYTES) -> dict:
    """The pack as ``summary.json`` has it (times in UTC, ISO 8601)."""
    summary = pack.summary
    return {
        "target": {"kind": pack.kind, "id": pack.target_id, "user": pack.user,
                   "user_id": pack.user_id, "identity": pack.identity,
                   "domain": pack.domain},
        "window": {"since": pack.since, "until": pack.generated_at},
        "lock": asdict(pack.lock),
        "counts": asdict(pack.counts),
        "first_message_at": pack.first_at,
        "last_message_at": pack.last_at,
        "top_recipient_domains": [{"domain": r.value, "recipients": r.count}
                                  for r in summary.recipient_domains],
        "sample_subjects": [{"subject": r.value, "messages": r.count}
                            for r in summary.subjects],
        "client_ips": [{"ip": r.value, "transactions": r.count} for r in summary.client_ips],
        "client_ips_total": summary.client_ips_total,
        "auth_networks": [{"network": r.value, "transactions": r.count,
                           "logins": list(r.extra)} for r in summary.auth_networks],
        "auth_networks_total": summary.auth_networks_total,
        "log_rows_summarised": pack.scanned_rows,
        "recipients_note": f"recipient domains count the first {message_log.FIRST_RECIPIENTS}"
                           " recipients the log keeps of each transaction",
        "log_search_url": pack.log_search_url,
        "messages": pack.samples,
        "omitted_messages": pack.omitted,
        "limits": {"max_messages": max_messages, "max_bytes": max_bytes,
                   "log_rows": SCAN_ROWS},
    }
