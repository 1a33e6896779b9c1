"""Outgoing > Archive: copies of relayed messages of senders with "Message archiving for
senders" on, filed under the sending user's domain (a shared smarthost's under the envelope
sender's, see ``outgoing.archive``). Search by sender, recipient, subject
and date; read safely; download as ``.eml``. Domain admins see their domain's archive only.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from flask import Blueprint, abort, render_template, request
from flask_login import login_required
from sqlalchemy import select

from outgoing.archive import ArchiveSearch, search_query
from outgoing.ids import parse_id
from outgoing.models import ArchivedMessage
from webapp import scope
from webapp.extensions import db, htmx
from webapp.stored_messages import download_response, view_response

bp = Blueprint("archive", __name__, url_prefix="/outgoing/archive")

PAGE_SIZE = 50
# The search form's fields: the only query arguments the "Older messages" link passes on
# (url_for takes "endpoint" and "_method" as its own: the link could not be built).
FIELDS = ("sender", "recipient", "subject", "from", "to")


def message_or_404(message_id: int) -> ArchivedMessage:
    row = db.session.scalar(scope.restrict(select(ArchivedMessage), ArchivedMessage)
                            .where(ArchivedMessage.id == message_id))
    if row is None:
        abort(404)
    return row


def _date(name: str, *, end: bool = False) -> tuple[datetime | None, str | None]:
    """A date field; with ``end`` the day is a whole day: everything before the next
    midnight (which 9999-12-31 has none of)."""
    value = request.args.get(name, "").strip()
    if not value:
        return None, None
    try:
        day = datetime.strptime(value, "%Y-%m-%d")
        return (day + timedelta(days=1) if end else day), None
    except ValueError:
        return None, f"{value} is not a date (YYYY-MM-DD)."
    except OverflowError:
        return None, f"{value} is past the last date that can be searched."


@bp.get("")
@login_required
def index():
    date_from, error_from = _date("from")
    date_to, error_to = _date("to", end=True)
    criteria = ArchiveSearch(
        sender=request.args.get("sender", "").strip()[:320],
        recipient=request.args.get("recipient", "").strip()[:320],
        subject=request.args.get("subject", "").strip()[:200],
        date_from=date_from,
        date_to=date_to)
    offset = parse_id(request.args.get("offset")) or 0  # never more than there are rows
    query = scope.restrict(search_query(criteria), ArchivedMessage)
    rows = list(db.session.scalars(query.offset(offset).limit(PAGE_SIZE + 1)))
    more = len(rows) > PAGE_SIZE
    args = {k: request.args[k] for k in FIELDS if request.args.get(k)}
    context = dict(rows=rows[:PAGE_SIZE], criteria=criteria, args=args,
                   errors=[e for e in (error_from, error_to) if e],
                   next_offset=offset + PAGE_SIZE if more else None,
                   title="Archive")
    if htmx and htmx.target == "archive-rows":
        return render_template("archive/_rows.html", **context)
    return render_template("archive/index.html", **context)


@bp.get("/<int:message_id>")
@login_required
def view(message_id: int):
    row = message_or_404(message_id)
    return view_response(row, "archive/view.html", f"Archived message {row.id}")


@bp.get("/<int:message_id>/download")
@login_required
def download(message_id: int):
    return download_response(message_or_404(message_id), f"archived-{message_id}.eml")
