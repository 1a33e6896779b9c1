"""Outgoing > Quarantine: the messages held as spam, with View, Release and Remove.

Both levels see this page; a domain admin sees only their domain's messages, and another
domain's message id is a 404. Release is an RQ job (``worker.quarantine_jobs.
release_quarantined``): the next hop may be slow or down, and the worker retries. Also the
``flask quarantine expire`` and ``flask nrd import FILE`` commands.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import click
from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.cli import AppGroup
from flask_login import login_required
from sqlalchemy import or_, select

from outgoing import audit
from outgoing.ids import parse_id
from outgoing.jobs import enqueue
from outgoing.models import QuarantinedMessage
from outgoing.newdomains import import_file
from outgoing.quarantine import expire_quarantine, recipients, remove_messages, rules_of
from webapp import scope
from webapp.auth import local_path
from webapp.extensions import db, htmx
from webapp.services import actor, redis_client
from webapp.stored_messages import download_response, view_response

bp = Blueprint("quarantine", __name__, url_prefix="/outgoing/quarantine")

RELEASE_JOB = "worker.quarantine_jobs.release_quarantined"
PAGE_SIZE = 50
MAX_BULK = 500


def message_or_404(message_id: int) -> QuarantinedMessage:
    row = db.session.scalar(scope.restrict(select(QuarantinedMessage), QuarantinedMessage)
                            .where(QuarantinedMessage.id == message_id))
    if row is None:
        abort(404)
    return row


def _listing(search: str, before: int | None):
    query = scope.restrict(select(QuarantinedMessage), QuarantinedMessage) \
        .order_by(QuarantinedMessage.id.desc())
    if search:
        query = query.where(or_(
            QuarantinedMessage.mail_from.icontains(search, autoescape=True),
            QuarantinedMessage.rcpt_tos.icontains(search, autoescape=True),
            QuarantinedMessage.subject.icontains(search, autoescape=True),
            QuarantinedMessage.identity.icontains(search, autoescape=True)))
    if before:
        query = query.where(QuarantinedMessage.id < before)
    rows = list(db.session.scalars(query.limit(PAGE_SIZE + 1)))
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    return rows, (rows[-1].id if more else None)


@bp.app_template_filter("recipients")
def _recipients_filter(row) -> list[str]:
    return recipients(row)


@bp.app_template_filter("rules")
def _rules_filter(row) -> list[str]:
    return rules_of(row)


@bp.get("")
@login_required
def index():
    search = request.args.get("q", "").strip()[:200]
    before = parse_id(request.args.get("before"))
    rows, next_before = _listing(search, before)
    context = dict(rows=rows, next_before=next_before, search=search, title="Quarantine",
                   retention=current_app.config.get("QUARANTINE_RETENTION_DAYS"))
    if htmx and htmx.target == "quarantine-rows":
        return render_template("quarantine/_rows.html", **context)
    return render_template("quarantine/index.html", **context)


@bp.get("/<int:message_id>")
@login_required
def view(message_id: int):
    row = message_or_404(message_id)
    return view_response(row, "quarantine/view.html", f"Quarantined message {row.id}")


@bp.get("/<int:message_id>/download")
@login_required
def download(message_id: int):
    return download_response(message_or_404(message_id), f"quarantined-{message_id}.eml")


def _release(rows: list[QuarantinedMessage]) -> int:
    queued = 0
    for row in rows:
        if row.released_at is not None:
            continue
        enqueue(redis_client(), RELEASE_JOB, row.id)
        audit.record(db.session, actor=actor(), action="release", target_type="quarantine",
                     target_id=row.id, domain_id=row.domain_id, mail_from=row.mail_from,
                     subject=row.subject)
        queued += 1
    db.session.commit()
    return queued


def _remove(rows: list[QuarantinedMessage]) -> int:
    for row in rows:
        audit.record(db.session, actor=actor(), action="remove", target_type="quarantine",
                     target_id=row.id, domain_id=row.domain_id, mail_from=row.mail_from,
                     subject=row.subject)
    return remove_messages(db.session, current_app.config, rows)


def _back():
    target = local_path(request.form.get("next"), "/outgoing/quarantine")
    if target is not None:
        return redirect(target)
    return redirect(url_for("quarantine.index"))


def _act(action: str, rows: list[QuarantinedMessage]):
    if not rows:
        flash("Select at least one message.", "error")
        return _back()
    if action == "release":
        try:
            queued = _release(rows)
        except Exception as exc:  # Redis down: nothing was queued for the rest
            db.session.rollback()
            current_app.logger.warning("could not queue a release: %s", exc)
            flash("The release could not be queued right now; try again in a minute.",
                  "error")
            return _back()
        flash(f"Release of {queued} message(s) queued; they are relayed to the next hop "
              "within moments." if queued else "Those messages were released already.",
              "success")
        return _back()
    count = _remove(rows)
    flash(f"Removed {count} message(s) from the quarantine.", "success")
    return redirect(url_for("quarantine.index"))


@bp.post("/<int:message_id>/release")
@login_required
def release(message_id: int):
    return _act("release", [message_or_404(message_id)])


@bp.post("/<int:message_id>/remove")
@login_required
def remove(message_id: int):
    return _act("remove", [message_or_404(message_id)])


@bp.post("/bulk")
@login_required
def bulk():
    action = request.form.get("action", "")
    if action not in ("release", "remove"):
        abort(400)
    ids = [i for i in map(parse_id, request.form.getlist("ids")[:MAX_BULK]) if i is not None]
    rows = list(db.session.scalars(
        scope.restrict(select(QuarantinedMessage), QuarantinedMessage)
        .where(QuarantinedMessage.id.in_(ids)))) if ids else []
    return _act(action, rows)


# -- command line -----------------------------------------------------------------------------
@bp.cli.command("expire")
def expire_command():
    """Remove quarantined messages older than QUARANTINE_RETENTION_DAYS now."""
    removed = expire_quarantine(db.session, current_app.config)
    click.echo(f"removed {removed} quarantined message(s)")


nrd_cli = AppGroup("nrd", help="Newly registered domains (for the MAIL-time check).")


@nrd_cli.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--registered-on", default=None,
              help="Registration date (YYYY-MM-DD, UTC) for lines without one; default now.")
def nrd_import(path: str, registered_on: str | None):
    """Load a newly registered domains list (one domain a line) into Redis."""
    now = time.time()
    when = now
    if registered_on:
        try:
            when = datetime.fromisoformat(registered_on).replace(tzinfo=UTC).timestamp()
        except ValueError:
            raise click.BadParameter("expected a date like 2026-11-28",
                                     param_hint="--registered-on") from None
    result = import_file(redis_client(), path, registered_at=when, now=now)
    click.echo(f"{result.added} domains imported, {result.skipped} lines skipped, "
               f"{result.dropped} old entries dropped")


bp.record_once(lambda state: state.app.cli.add_command(nrd_cli))
