"""Outgoing > Manage Identities: who, behind each outgoing user, actually sends.

Identities appear on first sight in the proxy; here an administrator finds them, locks,
unlocks and resets them, or adds one by hand (to lock a sender before it next sends).
"""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import login_required
from sqlalchemy import func, or_, select

from outgoing import audit, listing, locks
from outgoing.ids import parse_id
from outgoing.models import LOCK_MANUAL, Identity, OutgoingUser
from webapp import scope
from webapp.extensions import db, htmx
from webapp.forms.identities import AddIdentityForm
from webapp.forms.users import RowActionForm
from webapp.services import actor, redis_client
from webapp.users import back_to, lock_page, lock_reason

bp = Blueprint("identities", __name__, url_prefix="/outgoing/identities")


def _filter_user() -> OutgoingUser | None:
    """The outgoing user the list is narrowed to (``?user=<id>``), scoped: another domain's
    user is a 404."""
    text = request.args.get("user", "")
    if not text:
        return None
    user_id = parse_id(text)
    if user_id is None:
        abort(404)
    return scope.outgoing_user_or_404(user_id)


def _context(form: AddIdentityForm | None = None) -> dict:
    user = _filter_user()
    search = request.args.get("q", "").strip()[:listing.MAX_SEARCH]
    page = listing.identities_page(db.session, domain_id=scope.domain_id(),
                                   user_id=user.id if user else None, search=search,
                                   after=request.args.get("after"),
                                   before=request.args.get("before"))
    if form is None:
        form = AddIdentityForm()
        if user is not None:
            form.user.data = user.name
    return dict(page=page, identities=page.rows, search=search, filter_user=user, form=form,
                action_form=RowActionForm(), title="Manage Identities")


@bp.get("")
@login_required
def index():
    context = _context()
    if htmx and htmx.target == "identity-list":
        return render_template("_partials/identity_list.html", **context)
    return render_template("identities/index.html", **context)


def _user_named(name: str) -> OutgoingUser | None:
    """The visible outgoing user called ``name`` (IP/Range, username or domain)."""
    name = name.strip()
    query = scope.restrict(select(OutgoingUser), OutgoingUser).where(
        OutgoingUser.name.in_({name, name.lower()}))
    matches = list(db.session.scalars(query.limit(2)))
    return matches[0] if len(matches) == 1 else None


def _identity_of(user: OutgoingUser, value: str) -> str | None:
    """The user's identity ``value`` names, as stored; case-blind, so a row added by hand
    with capitals before identities were lower-cased here still counts as that one."""
    return db.session.scalar(select(Identity.value).where(
        Identity.user_id == user.id,
        or_(Identity.value == value, func.lower(Identity.value) == value)).limit(1))


@bp.post("")
@login_required
def add():
    form = AddIdentityForm()
    user = None
    if form.validate_on_submit():
        user = _user_named(form.user.data)
        if user is None:
            form.user.errors.append(f"No outgoing user is called {form.user.data.strip()}.")
        elif (known := _identity_of(user, form.value.data)) is not None:
            form.value.errors.append(f"{user.name} already has the identity {known}.")
            user = None
    if user is None:
        if htmx:
            return render_template("_partials/add_identity.html", form=form), 400
        return render_template("identities/index.html", **_context(form)), 400
    identity = Identity(user_id=user.id, value=form.value.data)
    db.session.add(identity)
    db.session.flush()
    audit.record(db.session, actor=actor(), action="create", target_type="identity",
                 target_id=identity.id, domain_id=user.domain_id, name=identity.value,
                 user=user.name, after={"identity": identity.value, "user": user.name})
    db.session.commit()
    flash(f"Added the identity {identity.value} to {user.name}.", "success")
    target = url_for("identities.index", user=user.id)
    if htmx:
        return "", 204, {"HX-Redirect": target}
    return redirect(target)


def _row_response(identity: Identity):
    if htmx:
        return render_template("_partials/identity_row.html", identity=identity,
                               action_form=RowActionForm())
    return redirect(back_to(url_for("identities.index", user=identity.user_id)))


@bp.get("/<int:identity_id>/lock")
@login_required
def lock_form(identity_id: int):
    """The row asking for the lock reason in place, instead of a prompt() pop-up."""
    identity = scope.identity_or_404(identity_id)
    if htmx:
        return render_template("_partials/identity_row.html", identity=identity, locking=True,
                               action_form=RowActionForm())
    return lock_page(name=identity.value,
                     action=url_for("identities.lock", identity_id=identity.id),
                     target=f"identity-{identity.id}",
                     back=url_for("identities.index", user=identity.user_id),
                     area="Manage Identities",
                     what=f"The identity {identity.value} of {identity.user.name}")


@bp.get("/<int:identity_id>/row")
@login_required
def row(identity_id: int):
    """One row as the list shows it (Cancel of an inline lock form)."""
    identity = scope.identity_or_404(identity_id)
    if htmx:
        return render_template("_partials/identity_row.html", identity=identity,
                               action_form=RowActionForm())
    return redirect(url_for("identities.index", user=identity.user_id))


@bp.post("/<int:identity_id>/lock")
@login_required
def lock(identity_id: int):
    identity = scope.identity_or_404(identity_id)
    form = RowActionForm()
    if form.validate_on_submit() and not identity.locked:
        locks.lock(db.session, redis_client(), identity, kind=LOCK_MANUAL,
                   reason=lock_reason(form), actor=actor(), claim_in_redis=False)
    return _row_response(identity)


@bp.post("/<int:identity_id>/unlock")
@login_required
def unlock(identity_id: int):
    identity = scope.identity_or_404(identity_id)
    if RowActionForm().validate_on_submit():
        locks.unlock(db.session, redis_client(), identity, actor=actor(),
                     reason=f"unlocked by {actor()}")
    return _row_response(identity)


@bp.post("/<int:identity_id>/reset")
@login_required
def reset(identity_id: int):
    identity = scope.identity_or_404(identity_id)
    if RowActionForm().validate_on_submit():
        locks.reset_unlock_count(db.session, identity, actor=actor())
    return _row_response(identity)
