"""Outgoing > Manage Authentication (all domains) and Manage Users (one domain)."""

from __future__ import annotations

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import select

from outgoing import audit, locks
from outgoing.models import LOCK_MANUAL, OutgoingUser
from outgoing.users import UserError, create_outgoing_user
from webapp import scope
from webapp.extensions import db, htmx
from webapp.forms.users import AddUserForm, RowActionForm
from webapp.services import actor, announce_change, redis_client

bp = Blueprint("users", __name__, url_prefix="/outgoing")

PAGE_SIZE = 50


def _page_title() -> str:
    return "Manage Authentication" if current_user.is_super else "Manage Users"


def _add_form() -> AddUserForm:
    form = AddUserForm()
    form.domain.choices = [(d.name, d.name) for d in scope.visible_domains()]
    return form


def _list_users(search: str, after: str | None):
    query = scope.restrict(select(OutgoingUser), OutgoingUser).order_by(OutgoingUser.name,
                                                                         OutgoingUser.id)
    if search:
        query = query.where(OutgoingUser.name.startswith(search.lower(), autoescape=True))
    if after:
        query = query.where(OutgoingUser.name > after)
    rows = list(db.session.scalars(query.limit(PAGE_SIZE + 1)))
    more = len(rows) > PAGE_SIZE
    return rows[:PAGE_SIZE], (rows[PAGE_SIZE - 1].name if more else None)


@bp.get("/users")
@login_required
def index():
    search = request.args.get("q", "").strip()[:320]
    users, next_after = _list_users(search, request.args.get("after"))
    context = dict(users=users, next_after=next_after, search=search, title=_page_title(),
                   action_form=RowActionForm())
    if htmx and htmx.target == "user-rows":
        return render_template("_partials/user_rows.html", **context)
    return render_template("users/index.html", add_form=_add_form(), **context)


@bp.post("/users")
@login_required
def add():
    form = _add_form()
    user = None
    if form.validate_on_submit():
        domain = scope.visible_domain(form.domain.data)
        if domain is None:
            form.domain.errors.append("Choose one of your domains.")
        else:
            kind = form.kind.data
            name = {"ip": form.ip_range.data, "user": form.username.data,
                    "domain": domain.name}[kind] or ""
            try:
                user = create_outgoing_user(db.session, domain=domain, kind=kind, name=name,
                                            password=form.password.data or None)
            except UserError as exc:
                getattr(form, exc.field, form.kind).errors.append(str(exc))
                db.session.rollback()
    if user is None:
        users, next_after = _list_users("", None)
        return render_template("users/index.html", add_form=form, users=users,
                               next_after=next_after, search="", title=_page_title(),
                               action_form=RowActionForm()), 400
    audit.record(db.session, actor=actor(), action="create", target_type="user",
                 target_id=user.id, domain_id=user.domain_id, name=user.name, kind=user.kind)
    db.session.commit()
    announce_change()
    flash(f"Added {user.kind_label} {user.name}.", "success")
    return redirect(url_for("users.index"))


def _row_response(user: OutgoingUser):
    if htmx:
        return render_template("_partials/user_row.html", user=user,
                               action_form=RowActionForm())
    return redirect(url_for("users.index"))


@bp.post("/users/<int:user_id>/lock")
@login_required
def lock(user_id: int):
    user = scope.outgoing_user_or_404(user_id)
    if RowActionForm().validate_on_submit() and not user.locked:
        locks.lock(db.session, redis_client(), user, kind=LOCK_MANUAL,
                   reason=f"locked by {actor()}", actor=actor(), claim_in_redis=False)
    return _row_response(user)


@bp.post("/users/<int:user_id>/unlock")
@login_required
def unlock(user_id: int):
    user = scope.outgoing_user_or_404(user_id)
    if RowActionForm().validate_on_submit():
        locks.unlock(db.session, redis_client(), user, actor=actor(),
                     reason=f"unlocked by {actor()}")
    return _row_response(user)


@bp.post("/users/<int:user_id>/reset")
@login_required
def reset(user_id: int):
    user = scope.outgoing_user_or_404(user_id)
    if RowActionForm().validate_on_submit():
        locks.reset_unlock_count(db.session, user, actor=actor())
    return _row_response(user)
