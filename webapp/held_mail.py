"""Outgoing > Held Mail: messages compromise detection's Hold rung accepted and kept.

Scoped per domain like the quarantine (another domain's id is a 404). Release only marks
messages ``queued``; the worker sends them at the user's release pace
(``worker.held_jobs.release_for_user``), so a release never floods the next hop. Each row
shows what the next hop answered: released (with any recipients it refused), refused (the
sender got a delivery report), or retrying (its last reply and the next try).
"""

from __future__ import annotations

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import login_required
from sqlalchemy import select

from outgoing import audit, held
from outgoing.jobs import enqueue
from outgoing.models import HELD, HeldMessage
from outgoing.quarantine import recipients
from outgoing.storage import StorageError, read_body
from scoring.retry import parse_delays
from webapp import scope
from webapp.extensions import db
from webapp.services import actor, redis_client

bp = Blueprint("held_mail", __name__, url_prefix="/outgoing/held")
RELEASE_JOB = "worker.held_jobs.release_for_user"
PAGE_SIZE = 100


def _scoped():
    return scope.restrict(select(HeldMessage), HeldMessage)


def message_or_404(message_id: int) -> HeldMessage:
    row = db.session.scalar(_scoped().where(HeldMessage.id == message_id))
    if row is None:
        abort(404)
    return row


@bp.get("")
@login_required
def index():
    rows = db.session.scalars(_scoped().order_by(HeldMessage.id.desc()).limit(PAGE_SIZE)).all()
    return render_template("held/index.html", rows=rows, recipients=recipients,
                           signals_of=held.signals_of, title="Held Mail", **_state_help())


def _state_help() -> dict:
    """What the templates need to explain a row's state: when a retry is due, and the date
    before which mail still held is past HELD_RETENTION_DAYS."""
    delays = parse_delays(current_app.config["DEFER_RETRY_SECONDS"])
    return {"next_try_at": lambda row: held.next_try_at(row, delays),
            "overdue_before": held.retention_cutoff(current_app.config),
            "retention_days": current_app.config.get("HELD_RETENTION_DAYS")}


@bp.get("/<int:message_id>")
@login_required
def view(message_id: int):
    row = message_or_404(message_id)
    try:
        body = read_body(current_app.config, row)[:200_000].decode("utf-8", "replace")
    except StorageError:
        body = "(the stored body cannot be read)"
    return render_template("held/view.html", row=row, body=body, recipients=recipients,
                           signals=held.signals_of(row), title=f"Held message {row.id}",
                           **_state_help())


def _release(rows: list[HeldMessage], what: str) -> None:
    """Release what is still held: a message released already (or being sent) is neither
    queued again nor audited as released again."""
    queued = held.queue_held(db.session, rows)
    for row in queued:
        audit.record(db.session, actor=actor(), action="release_held", target_type="held",
                     target_id=row.id, domain_id=row.domain_id, identity=row.identity,
                     what=what)
    db.session.commit()
    for user_id in sorted({row.user_id for row in queued if row.user_id}):
        enqueue(redis_client(), RELEASE_JOB, user_id, retry=None)
    if queued:
        flash(f"Releasing {len(queued)} message(s) at the user's release pace.", "success")
    else:
        flash("Nothing to release: released already, or on its way.", "error")


@bp.post("/<int:message_id>/release")
@login_required
def release(message_id: int):
    _release([message_or_404(message_id)], "message")
    return redirect(url_for("held_mail.index"))


@bp.post("/<int:message_id>/release-identity")
@login_required
def release_identity(message_id: int):
    """Every held message of this message's identity (same user), in this admin's scope."""
    row = message_or_404(message_id)
    rows = db.session.scalars(_scoped().where(
        HeldMessage.user_id == row.user_id, HeldMessage.identity == row.identity,
        HeldMessage.state == HELD)).all()
    _release(list(rows), "identity")
    return redirect(url_for("held_mail.index"))


@bp.post("/<int:message_id>/delete")
@login_required
def delete(message_id: int):
    row = message_or_404(message_id)
    event = dict(target_id=row.id, domain_id=row.domain_id, identity=row.identity,
                 subject=row.subject)
    count = held.delete_held(db.session, current_app.config, [row])
    if count:  # a message being sent is not deleted, and its audit log says nothing of it
        audit.record(db.session, actor=actor(), action="delete_held", target_type="held",
                     **event)
        db.session.commit()
    flash("Deleted." if count else "It is being sent right now; not deleted.",
          "success" if count else "error")
    if request.form.get("back") == "view" and not count:
        return redirect(url_for("held_mail.view", message_id=message_id))
    return redirect(url_for("held_mail.index"))
