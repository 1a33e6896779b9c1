"""A sender's activity per hour or per day, from the message log: one grouped query per chart.

The query walks ``ix_message_log_user_at`` (user, then the span's time range) and counts in
the database, so a busy sender's 30 days cost one index range scan, not 30 days of rows in
Python. What each verdict counts as is ``scoring.activity``'s.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Integer, and_, case, cast, func, literal_column, select

from outgoing.models import MessageLogEntry
from scoring import activity
from scoring.activity import Bucket, Span


def _naive(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)


def _bucket_index(session, span: Span):
    """The bucket number of a row (UTC epoch seconds // bucket length), per dialect."""
    at = MessageLogEntry.at
    if session.get_bind().dialect.name == "postgresql":
        seconds = func.extract("epoch", at)  # a timestamp without time zone reads as UTC
        return cast(func.floor(seconds / span.seconds), Integer)
    seconds = cast(func.strftime("%s", at), Integer)
    return cast(seconds / literal_column(str(span.seconds)), Integer)


def buckets(session, *, user_id: int, span: Span, now: float, identity: str | None = None,
            domain_id: int | None = None) -> list[Bucket]:
    """Messages, recipients, spam and refusals of the user (or one identity of it) in every
    bucket of ``span`` ending now, oldest first. ``domain_id`` counts only what the user sent
    in that domain: a user the provider moved keeps its id, and its mail from before is the
    old domain's."""
    entry = MessageLogEntry
    start, end = activity.bounds(now, span)
    index = _bucket_index(session, span).label("bucket")
    message = and_(entry.stage.not_in(activity.NOT_MESSAGES_STAGES),
                   entry.verdict.not_in(activity.NOT_MESSAGES_VERDICTS))
    whole = and_(entry.verdict.in_(activity.REFUSED_VERDICTS), entry.refused_count == 0)
    query = (
        select(index,
               func.sum(case((message, 1), else_=0)),
               func.sum(case((message, entry.rcpt_count), else_=0)),
               func.sum(case((entry.verdict.in_(activity.SPAM_VERDICTS), 1), else_=0)),
               func.sum(entry.refused_count + case((whole, 1), else_=0)))
        .where(entry.user_id == user_id, entry.at >= _naive(start), entry.at < _naive(end))
        .group_by(index))
    if identity is not None:
        query = query.where(entry.identity == identity)
    if domain_id is not None:
        query = query.where(entry.domain_id == domain_id)
    return activity.fill(session.execute(query).all(), now, span)
