"""The unlock link of a lock alert: a confirmation page, then one POST that unlocks.

The link names one user or identity and one lock, is signed, expires and works once. Opening
it never unlocks anything: mail scanners and link previews follow links with GET, so the page
only shows what would be unlocked, and a logged-in administrator of that domain confirms with
a POST carrying the CSRF token. The spent token id goes into ``used_tokens`` in the same
transaction as the unlock.
"""

from __future__ import annotations

import json

import redis
from flask import Blueprint, current_app, render_template, request
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from sqlalchemy.exc import IntegrityError

from outgoing import jobs, locks
from outgoing.models import Identity, OutgoingUser, UsedToken
from outgoing.tokens import InvalidUnlockToken, read_unlock_token
from webapp.extensions import db
from webapp.services import actor, announce_change, redis_client

bp = Blueprint("unlock", __name__)

REFUSALS = {
    "tampered": (400, "This unlock link is not valid",
                 "The link is incomplete or was changed. Copy the whole link from the alert, "
                 "or unlock in Outgoing > Manage Users."),
    "invalid": (400, "This unlock link is not valid",
                "The link is incomplete or was changed. Copy the whole link from the alert, "
                "or unlock in Outgoing > Manage Users."),
    "expired": (410, "This unlock link has expired",
                "Unlock links work for a limited time. Unlock in Outgoing > Manage Users "
                "instead."),
    "used": (410, "This unlock link has already been used",
             "Each unlock link works once. If the sender is locked again, use the link of "
             "the newer alert or Outgoing > Manage Users."),
    "ended": (409, "Nothing to unlock",
              "The lock this link was sent for has already ended."),
    "replaced": (409, "This link belongs to an earlier lock",
                 "The sender was unlocked and locked again since this link was sent. Use the "
                 "link of the newer alert or Outgoing > Manage Users."),
    "unavailable": (503, "Not unlocked",
                    "The lock store could not be reached, so nothing was changed. Please try "
                    "again in a moment."),
}


class ConfirmUnlockForm(FlaskForm):
    """Carries only the CSRF token: confirming is the whole input."""


def _ensure_periodic_jobs(state) -> None:
    """The sweep of expired locks and the daily reports run as self-scheduling jobs; the web
    app's start puts a chain back if Redis lost it (see outgoing.jobs)."""
    try:
        jobs.ensure_periodic(state.app.extensions["og_redis"])
    except Exception as exc:  # Redis down at start: the proxy and the next lock retry it
        state.app.logger.warning("could not schedule the periodic jobs: %s", exc)


bp.record_once(_ensure_periodic_jobs)


def _refuse(reason: str, target=None):
    status, title, text = REFUSALS[reason]
    return render_template("unlock/refused.html", title=title, text=text, reason=reason,
                           target=target), status


def _visible(target) -> bool:
    if target is None:
        return False
    domain_id = target.user.domain_id if isinstance(target, Identity) else target.domain_id
    return current_user.is_super or domain_id == current_user.domain_id


@bp.route("/unlock/<token>", methods=["GET", "POST"])
@login_required
def confirm(token: str):
    try:
        claim = read_unlock_token(current_app.config["SECRET_KEY"], token,
                                  max_age=current_app.config["UNLOCK_LINK_MAX_AGE"])
    except InvalidUnlockToken as exc:
        return _refuse(exc.reason)
    model = Identity if claim.kind == "identity" else OutgoingUser
    target = db.session.get(model, claim.target_id)
    if not _visible(target):
        return _refuse_missing()
    if db.session.get(UsedToken, claim.jti) is not None:
        return _refuse("used", target)
    if not target.locked:
        return _refuse("ended", target)
    if target.lock_id != claim.lock_id:
        return _refuse("replaced", target)

    form = ConfirmUnlockForm()
    if request.method == "POST" and form.validate_on_submit():
        db.session.add(UsedToken(jti=claim.jti))
        try:
            db.session.flush()  # a second tab confirming the same link stops here
        except IntegrityError:
            db.session.rollback()
            return _refuse("used", target)
        try:
            locks.unlock(db.session, redis_client(), target, actor=actor(),
                         reason="unlocked with the link of the lock alert")
        except redis.RedisError as exc:
            db.session.rollback()
            current_app.logger.warning("unlock link: Redis unavailable: %s", exc)
            return _refuse("unavailable", target)
        announce_change()
        return render_template("unlock/done.html", target=target, who=_who(target),
                               title="Unlocked")
    spam = [(row, _recipients(row)) for row in locks.triggering_spam(
        db.session, target, window_seconds=current_app.config["SPAM_WINDOW_SECONDS"])]
    owner = target.user if isinstance(target, Identity) else target
    return render_template("unlock/confirm.html", target=target, owner=owner,
                           who=_who(target), spam=spam, form=form,
                           title="Unlock?"), 200 if request.method == "GET" else 400


def _refuse_missing():
    """Another domain's user looks exactly like one that does not exist."""
    return render_template("unlock/refused.html", title="Not found",
                           text="There is nothing to unlock here for your account.",
                           reason="missing", target=None), 404


def _recipients(row) -> list[str]:
    try:
        value = json.loads(row.rcpt_tos or "[]")
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _who(target) -> str:
    if isinstance(target, Identity):
        return f"identity {target.value} of {target.user.name}"
    return f"{target.kind_label} {target.name}"
