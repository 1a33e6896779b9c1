"""The Outgoing User Settings page ("Add & Configure" lands here; Save writes it).

Fields the user's type does not have are left out; hidden parts of the form (connection
limits while they are off, header rows while another identification method is chosen) keep
their stored values. Every saved change is audited with its before/after and announced to
the proxies.
"""

from __future__ import annotations

import time

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import select

from outgoing import audit, newdomains
from outgoing.ids import parse_id
from outgoing.models import DKIM_DEFAULT, ID_HEADER, KIND_DOMAIN, KIND_IP, DkimKey, OutgoingUser
from outgoing.usage import usage_rows
from outgoing.users import (
    LIMIT_FIELDS,
    SETTINGS,
    UserError,
    apply_settings,
    confirmed_overlaps,
    limit_order_problem,
)
from webapp import scope
from webapp.address_confirmation import request_confirmation, unconfirmed
from webapp.extensions import db, htmx
from webapp.forms import choices
from webapp.forms.user_settings import (
    HELP,
    KIND_NAMES,
    MAX_HEADERS,
    SECTIONS,
    SUPER_ONLY,
    HeaderRowForm,
    UserSettingsForm,
    for_kind,
)
from webapp.forms.users import RowActionForm, check_new_password
from webapp.services import actor, announce_change, redis_client

bp = Blueprint("user_settings", __name__, url_prefix="/outgoing/users")
DETECTION_NUMBERS = ("detection_throttle_at", "detection_hold_at", "detection_lock_at",
                     "detection_throttle_rate", "detection_new_sender_allowance",
                     "detection_release_pace")


def _initial_data(user: OutgoingUser) -> dict:
    data = {name: getattr(user, name) for name in SETTINGS}
    data["lock_template_id"] = str(user.lock_template_id or "")
    data["dkim_selector"] = user.dkim_selector or ""
    data["contact_email"] = user.contact_email or ""
    data["domain"] = user.domain.name
    data["ip_range"] = data["username"] = user.name
    data["headers"] = [
        {"header_name": h.header_name, "regex": h.regex or "", "remove_header": h.remove_header}
        for h in user.identification_headers
    ] or [{"header_name": "", "regex": "", "remove_header": False}]
    return data


def _selectors(domain_id: int) -> list[str]:
    return list(db.session.scalars(select(DkimKey.selector).where(DkimKey.domain_id == domain_id)
                                   .order_by(DkimKey.selector)))


def _build_form(user: OutgoingUser, *, stored: bool = False) -> UserSettingsForm:
    """The form as posted, or (GET, or ``stored`` after a save) as the database has it."""
    if request.method == "POST" and not stored:
        form = UserSettingsForm()
        form.ip_range.data = form.username.data = user.name
        # Blank header rows (an unused new row) are not rules; drop them before validating.
        form.headers.entries = [e for e in form.headers.entries
                                if (e.header_name.data or "").strip()
                                or (e.regex.data or "").strip()]
    else:
        form = UserSettingsForm(formdata=None, data=_initial_data(user))
    for_kind(form, user.kind, is_super=current_user.is_super)
    templates = db.session.scalars(scope.lock_templates_query(user.domain_id))
    form.lock_template_id.choices = choices([("", "Default template")] + [
        (str(t.id), t.name + ("" if t.domain_id else " (all domains)")) for t in templates])
    selectors = _selectors(user.domain_id)
    if user.dkim_selector and user.dkim_selector not in selectors + [DKIM_DEFAULT]:
        selectors.append(user.dkim_selector)  # keep showing a selector whose key is gone
    form.dkim_selector.choices = choices([("", "Do not sign")] + _default_choice(user)
                                         + [(s, s) for s in selectors])
    return form


def _newly_registered_available() -> bool:
    """Whether "Reject messages from newly registered domains" can do anything: without a
    source of registration dates the proxy lets every domain through."""
    return newdomains.available(current_app.config, redis_client())


def _default_choice(user: OutgoingUser) -> list[tuple[str, str]]:
    """"Use the default" with what it means for this domain right now."""
    selector = current_app.config["DKIM_DEFAULT_SELECTOR"]
    if not selector:
        return []
    published = db.session.scalar(select(DkimKey.dns_published).where(
        DkimKey.domain_id == user.domain_id, DkimKey.selector == selector))
    state = "signing" if published else "not signing until its DNS record is published"
    return [(DKIM_DEFAULT, f"Use the default ({selector}, {state})")]


def _domain_editable(user: OutgoingUser) -> bool:
    return current_user.is_super and user.kind != KIND_DOMAIN


def _validate(form: UserSettingsForm, user: OutgoingUser):
    """Run every check; returns (values, headers, domain, password) or None with the errors
    left on the form's fields."""
    form.validate_on_submit()  # field errors; the checks below add the cross-field ones
    if form.csrf_token.errors:
        return None
    values = {name: form[name].data for name in SETTINGS if name in form}
    values["lock_template_id"] = _template_id(values.get("lock_template_id"), user.domain_id)
    values["dkim_selector"] = values.get("dkim_selector") or None
    for name in DETECTION_NUMBERS:
        if name in values and values[name] is None:
            values[name] = getattr(user, name)
    if "compromise_detection" in values and "compromise_detection" not in request.form \
            and "detection_shadow_mode" not in request.form \
            and not any(name in request.form for name in DETECTION_NUMBERS):
        # A post without the section (an older form, a script): keep detection as stored.
        values["compromise_detection"] = user.compromise_detection
        values["detection_shadow_mode"] = user.detection_shadow_mode
    if user.kind != KIND_IP:
        values.pop("reauthenticate_as", None)
    if not _newly_registered_available():
        # Shown disabled: a posted value would promise a check that cannot happen.
        values.pop("reject_newly_registered_domains", None)
        form.reject_newly_registered_domains.data = user.reject_newly_registered_domains
    _check_limits(form, user, values)
    headers = _check_headers(form, values)
    password = _check_password(form)
    domain = _check_domain(form, user, values)
    if _has_errors(form):
        return None
    return values, headers, domain, password


def _template_id(text: str | None, domain_id: int) -> int | None:
    """The chosen lock template; one this admin may not use for this domain is a 404."""
    if not text:
        return None
    allowed = {t.id for t in db.session.scalars(scope.lock_templates_query(domain_id))}
    template_id = parse_id(text)
    if template_id not in allowed:
        abort(404)
    return template_id


def _check_limits(form, user: OutgoingUser, values: dict) -> None:
    if not values.get("connection_limits_enabled"):
        for name in LIMIT_FIELDS:  # hidden while off: keep what is stored
            values[name] = getattr(user, name)
            form[name].errors = []
        return
    limits = {name: values[name] for name in LIMIT_FIELDS}
    if all(v is None for v in limits.values()) and not any(
            form[name].errors for name in LIMIT_FIELDS):
        form.connection_limits_enabled.errors = [
            "Set at least one Limit per ... below, or turn the limits off."]
    problem = limit_order_problem(limits)
    if problem and not form[problem[0]].errors:
        form[problem[0]].errors = [problem[1]]


def _check_headers(form, values: dict) -> list | None:
    """The header rows to store, or None to keep the stored ones (another method chosen)."""
    if values.get("identification_method") != ID_HEADER:
        for entry in form.headers.entries:  # hidden: neither checked nor changed
            for sub in entry.form:
                sub.errors = []
        return None
    headers = [(e.header_name.data.strip(), (e.regex.data or "").strip(),
                bool(e.remove_header.data)) for e in form.headers.entries]
    if not headers:
        form.identification_method.errors = [
            "Add at least one header to read the identity from."]
    return headers


def _check_password(form) -> str | None:
    """A new password (empty keeps the old one), strong enough and confirmed."""
    if "password" not in form or not form.password.data:
        return None
    problem = check_new_password(form.password.data, form.confirm_password.data)
    if problem:
        form[problem[0]].errors = [problem[1]]
    return form.password.data


def _check_domain(form, user: OutgoingUser, values: dict):
    """The user's new domain (super admins only), and that its DKIM selector and lock
    template exist there."""
    domain = None
    if _domain_editable(user):
        try:
            domain = scope.domain_named(form.domain.data)
        except ValueError as exc:
            form.domain.errors = [str(exc)]
    elif (form.domain.data or "").strip().lower() not in ("", user.domain.name):
        if not current_user.is_super:
            abort(404)
        form.domain.errors = ["An Authenticating Domain cannot move to another domain."]
    target_id = domain.id if domain else user.domain_id
    selector = values["dkim_selector"]
    if selector and selector != DKIM_DEFAULT and selector not in _selectors(target_id) and (
            selector != user.dkim_selector or target_id != user.domain_id):
        form.dkim_selector.errors = ["That selector has no key in this domain; create one on "
                                     "the DKIM page first."]
    if target_id != user.domain_id and values["lock_template_id"] is not None:
        allowed = {t.id for t in db.session.scalars(scope.lock_templates_query(target_id))}
        if values["lock_template_id"] not in allowed:
            form.lock_template_id.errors = ["This template belongs to the old domain."]
    return domain


def _has_errors(form) -> bool:
    for field in form:
        if field.name == "headers":
            if any(sub.errors for entry in field.entries for sub in entry.form):
                return True
        elif field.errors:
            return True
    return False


def _usage(user: OutgoingUser):
    """Every limit window's current use and reset time, or None when Redis cannot say."""
    try:
        return usage_rows(redis_client(), user, time.time())
    except Exception:  # Redis down: the page still works, without the numbers
        return None


def _failed_registration_lookups() -> int | None:
    """RDAP look-ups that failed today (they let mail through unchecked), or None when RDAP
    is not configured or Redis cannot say."""
    if not (current_app.config.get("RDAP_URL") or "").strip():
        return None
    try:
        return newdomains.failed_lookups_today(redis_client(), time.time())
    except Exception:  # Redis down: the usage panel says so already
        return None


def _render(user: OutgoingUser, form: UserSettingsForm, status: int = 200, saved=False,
            overlap_needs_confirm: bool = False):
    context = dict(user=user, form=form, help=HELP, sections=SECTIONS, saved=saved,
                   contact_unconfirmed=unconfirmed(user.domain, user.contact_email),
                   overlap_needs_confirm=overlap_needs_confirm,
                   kind_names=KIND_NAMES, usage=_usage(user), max_headers=MAX_HEADERS,
                   newly_registered_available=_newly_registered_available(),
                   failed_registration_lookups=_failed_registration_lookups(),
                   domain_editable=_domain_editable(user), action_form=RowActionForm(),
                   title=f"Outgoing User Settings: {user.name}",
                   domain_choices=[d.name for d in scope.visible_domains()]
                   if _domain_editable(user) else [])
    if htmx and htmx.target == "user-settings":
        return render_template("_partials/user_settings_form.html", **context), status
    return render_template("users/settings.html", **context), status


@bp.route("/<int:user_id>", methods=["GET", "POST"])
@login_required
def edit(user_id: int):
    user = scope.outgoing_user_or_404(user_id)
    form = _build_form(user)
    if request.method == "GET":
        return _render(user, form)
    _audit_forged_fields(user)
    checked = _validate(form, user)
    if checked is None:
        return _render(user, form, 400)
    values, headers, domain, password = checked
    confirmed = "confirm_overlap" in form and bool(form.confirm_overlap.data)
    try:
        changes = apply_settings(db.session, user, values, headers=headers, domain=domain,
                                 password=password,
                                 authority=scope.authority(confirm_overlap=confirmed))
    except UserError as exc:
        db.session.rollback()
        user = scope.outgoing_user_or_404(user_id)
        getattr(form, exc.field, form.identification_method).errors = [str(exc)]
        return _render(user, form, 400, overlap_needs_confirm=exc.needs_confirm)
    if changes:
        detail = confirmed_overlaps(db.session, user) if "domain" in changes else {}
        audit.record(db.session, actor=actor(), action="update", target_type="user",
                     target_id=user.id, domain_id=user.domain_id, name=user.name,
                     changes=changes, **detail)
    db.session.commit()
    if changes:
        announce_change()
    message = "Saved." if changes else "Saved (nothing had changed)."
    asked = request_confirmation(user.domain, user.contact_email,
                                 typed="contact_email" in changes)
    if htmx:
        form = _build_form(user, stored=True)
        return _render(user, form, saved=" ".join(filter(None, (message, asked))))
    flash(message, "success")
    if asked:
        flash(asked, "info")
    return redirect(url_for("user_settings.edit", user_id=user.id))


def _audit_forged_fields(user: OutgoingUser) -> None:
    """A domain admin's post carrying a super-admin-only field was not made by our form:
    the field is ignored (it is not on their form), and the attempt is recorded."""
    if current_user.is_super:
        return
    forged = sorted(name for name in SUPER_ONLY if name in request.form)
    if forged:
        current_app.logger.warning("%s posted super-admin-only fields %s for user %s",
                                   actor(), forged, user.id)
        audit.record(db.session, actor=actor(), action="forged_field", target_type="user",
                     target_id=user.id, domain_id=user.domain_id, name=user.name,
                     fields=forged, ignored=True)
        db.session.commit()


@bp.get("/<int:user_id>/header-row")
@login_required
def header_row(user_id: int):
    """A blank identification-header row for the settings form (HTMX "Add header")."""
    scope.outgoing_user_or_404(user_id)
    index = parse_id(request.args.get("index", "0"))
    if index is None or index > 10_000:
        return "", 400
    row = HeaderRowForm(prefix=f"headers-{index}-")
    return render_template("_partials/header_row.html", row=row, help=HELP)
