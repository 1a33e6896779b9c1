"""Outgoing > Log Search: every SMTP transaction the proxy saw, searchable per domain.

Scoped like every page: a domain admin sees their domain's rows only; rows without a
domain (refused before anyone authenticated) exist for super admins only. Paged newest
first with a keyset cursor (``outgoing/message_log.py``), so a page costs the same on the
first day and on the thirtieth.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from flask import Blueprint, abort, render_template, request
from flask_login import login_required
from sqlalchemy import select

from outgoing import message_log
from outgoing.models import MessageLogEntry, OutgoingUser
from webapp import scope
from webapp.extensions import db, htmx

bp = Blueprint("message_log", __name__, url_prefix=message_log.SEARCH_PATH)

PAGE_SIZE = message_log.PAGE_SIZE
FIELDS = ("from", "to", "user", "identity", "sender", "recipient", "message_id", "queue_id",
          "subject", "verdict")


# How much a "to" of each form takes in: a date its whole day, a minute its whole minute
# (the list shows minutes: a transaction listed at 12:25 is found with "to 12:25").
_TO_TAKES_IN = {"%Y-%m-%dT%H:%M": timedelta(minutes=1), "%Y-%m-%d %H:%M": timedelta(minutes=1),
                "%Y-%m-%dT%H:%M:%S": timedelta(seconds=1), "%Y-%m-%d": timedelta(days=1)}


def _moment(name: str, *, end: bool) -> tuple[datetime | None, str | None]:
    """A time from a ``datetime-local`` or date field (UTC); as "to", the whole of the day,
    minute or second it names."""
    value = request.args.get(name, "").strip()
    if not value:
        return None, None
    for pattern in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            moment = datetime.strptime(value, pattern)
        except ValueError:
            continue
        if end:
            try:
                moment += _TO_TAKES_IN[pattern]
            except OverflowError:
                return None, f"{value} is past the last time that can be searched."
        return moment, None
    return None, f"{value} is not a time (YYYY-MM-DD HH:MM, UTC)."


def _user_ids(name: str) -> list[int] | None:
    """The visible outgoing users called ``name`` (None: no user filter)."""
    name = name.strip().lower()[:320]
    if not name:
        return None
    query = scope.restrict(select(OutgoingUser.id), OutgoingUser).where(
        OutgoingUser.name == name)
    return list(db.session.scalars(query.limit(100)))


def _criteria() -> tuple[message_log.LogSearch, list[str]]:
    since, error_from = _moment("from", end=False)
    until, error_to = _moment("to", end=True)
    verdict = request.args.get("verdict", "").strip()
    criteria = message_log.LogSearch(
        since=since, until=until,
        user_ids=_user_ids(request.args.get("user", "")),
        identity=request.args.get("identity", "").strip()[:320],
        sender=request.args.get("sender", "").strip()[:320],
        recipient=request.args.get("recipient", "").strip()[:320],
        message_id=request.args.get("message_id", "").strip()[:320],
        queue_id=request.args.get("queue_id", "").strip()[:32],
        subject=request.args.get("subject", "").strip()[:200],
        verdict=verdict if verdict in message_log.VERDICTS else "")
    return criteria, [e for e in (error_from, error_to) if e]


@bp.get("")
@login_required
def index():
    criteria, errors = _criteria()
    page = message_log.search(db.session, criteria, domain_id=scope.domain_id(),
                              after=request.args.get("after"), size=PAGE_SIZE)
    args = {k: request.args[k] for k in FIELDS if request.args.get(k)}
    context = dict(rows=page.rows, next=page.next, args=args, errors=errors,
                   verdicts=message_log.VERDICTS, title="Log Search")
    if htmx and htmx.target == "log-rows":
        return render_template("_partials/log_rows.html", **context)
    return render_template("message_log/index.html", **context)


@bp.get("/<big_id:entry_id>")
@login_required
def view(entry_id: int):
    query = select(MessageLogEntry).where(MessageLogEntry.id == entry_id)
    domain_id = scope.domain_id()
    if domain_id is not None:
        query = query.where(MessageLogEntry.domain_id == domain_id)
    row = db.session.scalar(query.limit(1))
    if row is None:
        abort(404)
    return render_template("message_log/view.html", row=row,
                           recipients=message_log.recipients_of(row),
                           rules=message_log.rules_of(row), verdicts=message_log.VERDICTS,
                           title=f"Transaction {row.id}")
