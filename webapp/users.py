"""Outgoing > Manage Authentication (all domains) and Manage Users (one domain).

The list, the "Add a user" section (with per-field checks as you type) and the row actions
(lock, unlock, reset). The settings page of one user is in ``webapp.user_settings``.
"""

from __future__ import annotations

from flask import (
    Blueprint,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required

from outgoing import audit, listing, locks
from outgoing.models import KIND_DOMAIN, KIND_IP, KIND_USER, LOCK_MANUAL, Domain, OutgoingUser
from outgoing.users import (
    UserError,
    confirmed_overlaps,
    create_outgoing_user,
    identifying_fields,
)
from webapp import scope
from webapp.address_confirmation import request_confirmation
from webapp.auth import local_path
from webapp.extensions import db, htmx
from webapp.forms.users import KINDS, AddUserForm, RowActionForm, check_new_password
from webapp.services import actor, announce_change, redis_client

bp = Blueprint("users", __name__, url_prefix="/outgoing")

ADD_FIELDS = ("domain", "ip_range", "username", "password", "confirm_password")


def page_title() -> str:
    return "Manage Authentication" if current_user.is_super else "Manage Users"


def _add_form(formdata=None, domain_choices: list[str] | None = None) -> AddUserForm:
    form = AddUserForm(formdata=formdata) if formdata is not None else AddUserForm()
    if request.method == "GET":
        kind = request.args.get("kind", KIND_IP)
        form.kind.data = kind if kind in KINDS else KIND_IP
    if not current_user.is_super:
        # Not an input for them; a posted other domain is a 404 (scope.domain_named).
        form.domain.data = form.domain.data or current_user.domain.name
        form.confirm_overlap.data = False
    elif not form.domain.data and domain_choices and len(domain_choices) == 1:
        form.domain.data = domain_choices[0]
    return form


def _list_context() -> dict:
    search = request.args.get("q", "").strip()[:listing.MAX_SEARCH]
    page = listing.users_page(db.session, domain_id=scope.domain_id(), search=search,
                              after=request.args.get("after"),
                              before=request.args.get("before"))
    return dict(page=page, users=page.rows, search=search, title=page_title(),
                action_form=RowActionForm())


def _domain_choices() -> list[str]:
    """Suggestions for the Domain field of a super admin (a datalist; any domain may be
    typed)."""
    return [d.name for d in scope.visible_domains(limit=500)] if current_user.is_super else []


@bp.get("/users")
@login_required
def index():
    context = _list_context()
    if htmx and htmx.target == "user-list":
        return render_template("_partials/user_list.html", **context)
    choices = _domain_choices()
    return render_template("users/index.html", add_form=_add_form(domain_choices=choices),
                           domain_choices=choices, **context)


def _typed_name(form: AddUserForm, domain: Domain) -> str:
    """What identifies the new user: the IP/Range, the username, or the domain itself."""
    kind = form.kind.data if form.kind.data in KINDS else KIND_IP
    return {KIND_IP: form.ip_range.data, KIND_USER: form.username.data,
            KIND_DOMAIN: domain.name}[kind] or ""


def _check_identity(form: AddUserForm, *, quiet_when_empty: bool = False) -> Domain | None:
    """Domain and name checks against the database; errors go onto the form's fields.

    Returns the domain when everything checked out. ``quiet_when_empty``: a field not filled
    in yet is not an error (checks as you type)."""
    kind = form.kind.data if form.kind.data in KINDS else KIND_IP
    if quiet_when_empty and not form.domain.data:
        return None
    try:
        domain = scope.domain_named(form.domain.data)
    except ValueError as exc:
        form.domain.errors = [*form.domain.errors, str(exc)]
        return None
    name = _typed_name(form, domain)
    if quiet_when_empty and not name.strip():
        return None
    try:
        identifying_fields(db.session, domain=domain, kind=kind, name=name,
                           authority=_authority(form))
    except UserError as exc:
        _show_error(form, exc)
        return None
    return domain


def _authority(form: AddUserForm):
    return scope.authority(confirm_overlap=bool(form.confirm_overlap.data))


def _show_error(form: AddUserForm, exc: UserError) -> None:
    """The refusal under its field; an overlap a super admin may confirm also brings up the
    confirmation checkbox."""
    field = getattr(form, exc.field, form.domain)
    field.errors = [*field.errors, str(exc)]
    if exc.needs_confirm:
        form.overlap_needs_confirm = True


def _render_add_errors(form: AddUserForm):
    if htmx:
        return render_template("_partials/add_user.html", add_form=form,
                               domain_choices=_domain_choices()), 400
    return render_template("users/index.html", add_form=form,
                           domain_choices=_domain_choices(), **_list_context()), 400


@bp.post("/users")
@login_required
def add():
    form = _add_form(request.form)
    valid = form.validate_on_submit()
    if form.csrf_token.errors:
        return _render_add_errors(form)
    domain = _check_identity(form)
    if not valid or domain is None:
        return _render_add_errors(form)
    kind = form.kind.data
    try:
        user = create_outgoing_user(
            db.session, domain=domain, kind=kind, name=_typed_name(form, domain),
            password=form.password.data if kind in (KIND_USER, KIND_DOMAIN) else None,
            authority=_authority(form))
    except UserError as exc:  # taken in the meantime
        db.session.rollback()
        _show_error(form, exc)
        return _render_add_errors(form)
    audit.record(db.session, actor=actor(), action="create", target_type="user",
                 target_id=user.id, domain_id=user.domain_id, name=user.name, kind=user.kind,
                 after={"name": user.name, "kind": user.kind_label, "domain": domain.name},
                 **confirmed_overlaps(db.session, user))
    db.session.commit()
    announce_change()
    asked = request_confirmation(domain, user.contact_email, typed=True)
    if asked:
        flash(asked, "info")
    if request.form.get("action") == "add":
        flash(f"Added {user.kind_label} {user.name} with the default settings.", "success")
        target = url_for("users.index")
    else:
        flash(f"Added {user.kind_label} {user.name}. Review its settings and press Save.",
              "success")
        target = url_for("user_settings.edit", user_id=user.id)
    if htmx:
        response = make_response("", 204)
        response.headers["HX-Redirect"] = target
        return response
    return redirect(target)


@bp.post("/users/check")
@login_required
def check():
    """Check one field of "Add a user" while it is being filled in (HTMX, on change)."""
    form = _add_form(request.form)
    name = htmx.trigger_name if htmx and htmx.trigger_name in ADD_FIELDS else None
    name = name or request.args.get("field", "")
    if name not in ADD_FIELDS:
        return "", 400
    form.validate()
    if form.csrf_token.errors:
        return "", 400
    for field_name in ADD_FIELDS:
        getattr(form, field_name).errors = []
    if name in ("domain", "ip_range", "username"):
        _check_identity(form, quiet_when_empty=True)
    elif name in ("password", "confirm_password") and form.kind.data in (KIND_USER,
                                                                          KIND_DOMAIN):
        problem = check_new_password(form.password.data, form.confirm_password.data)
        if problem and form.password.data and (
                problem[0] == "password" or form.confirm_password.data):
            getattr(form, problem[0]).errors = [problem[1]]
    for other in ADD_FIELDS:  # only the field asked about shows errors
        if other != name:
            getattr(form, other).errors = []
    return render_template("_partials/add_user_message.html", add_form=form, name=name)


# --- row actions --------------------------------------------------------------------------

def _row_response(user: OutgoingUser):
    if htmx:
        return render_template("_partials/user_row.html", user=user,
                               action_form=RowActionForm())
    return redirect(back_to(url_for("users.index")))


def _same_site(url: str | None) -> bool:
    return bool(url) and url.startswith(request.host_url)


def back_to(default: str) -> str:
    """Where a row action without JavaScript returns: the form's ``next`` (a local path),
    else the page it came from, else ``default``."""
    target = local_path(request.form.get("next"), "/outgoing/")
    if target is not None:
        return target
    return request.referrer if _same_site(request.referrer) else default


def lock_reason(form: RowActionForm) -> str:
    typed = (form.reason.data or "").strip()
    return typed[:300] or f"locked by {actor()}"


def lock_page(*, name: str, action: str, target: str, back: str, area: str, what: str):
    """Lock without JavaScript: a page with the reason form the row shows in place."""
    return render_template("users/lock.html", name=name, action=action, target=target,
                           back=back, area=area, what=what, title=f"Lock {name}")


@bp.get("/users/<int:user_id>/lock")
@login_required
def lock_form(user_id: int):
    """The row asking for the lock reason in place, instead of a prompt() pop-up."""
    user = scope.outgoing_user_or_404(user_id)
    if htmx:
        return render_template("_partials/user_row.html", user=user, locking=True,
                               action_form=RowActionForm())
    return lock_page(name=user.name, action=url_for("users.lock", user_id=user.id),
                     target=f"user-{user.id}", back=url_for("users.index"),
                     area=page_title(), what=f"The outgoing user {user.name}")


@bp.get("/users/<int:user_id>/row")
@login_required
def row(user_id: int):
    """One row as the list shows it (Cancel of an inline lock form)."""
    user = scope.outgoing_user_or_404(user_id)
    if htmx:
        return render_template("_partials/user_row.html", user=user,
                               action_form=RowActionForm())
    return redirect(url_for("users.index"))


@bp.post("/users/<int:user_id>/lock")
@login_required
def lock(user_id: int):
    user = scope.outgoing_user_or_404(user_id)
    form = RowActionForm()
    if form.validate_on_submit() and not user.locked:
        locks.lock(db.session, redis_client(), user, kind=LOCK_MANUAL,
                   reason=lock_reason(form), actor=actor(), claim_in_redis=False)
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
