"""Logging in and out of the control panel."""

import re
from urllib.parse import urlsplit

from flask import Blueprint, flash, redirect, render_template, request, session, url_for
from flask_login import current_user, login_required, login_user, logout_user
from sqlalchemy import select

from outgoing.ids import parse_id
from outgoing.models import Admin
from outgoing.passwords import verify_password
from webapp.extensions import db, login_manager
from webapp.forms.auth import LoginForm

bp = Blueprint("auth", __name__)


@login_manager.user_loader
def load_admin(session_id: str):
    """The admin of a session (``Admin.get_id``) while its generation is still theirs."""
    id_text, _, generation = session_id.partition(":")
    row_id = parse_id(id_text)
    admin = db.session.get(Admin, row_id) if row_id is not None else None
    if admin is None or generation != str(admin.session_generation):
        return None
    return admin


_EDGE = "".join(map(chr, range(0x21)))  # C0 controls and space, stripped at both ends
_REMOVED = re.compile(r"[\t\r\n]")  # removed anywhere in a URL
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: ``next`` only when it stays on the panel.

    Checked as a browser will read the Location header (WHATWG URL): leading and trailing
    C0 controls and spaces stripped, tab, CR and LF removed anywhere, and ``\\`` taken for
    ``/``. So ``/%09/evil.test`` (a tab) or ``/\\evil.test``, which a plain
    ``startswith("//")`` lets through, are seen as the other host they lead to. The cleaned
    value is what we send."""
    cleaned = _REMOVED.sub("", (target or "").strip(_EDGE))
    as_browser = cleaned.replace("\\", "/")
    try:
        parts = urlsplit(as_browser)
    except ValueError:
        parts = None
    if (parts is not None and as_browser.startswith("/") and not as_browser.startswith("//")
            and not parts.scheme and not parts.netloc and not _CONTROL.search(cleaned)):
        return cleaned
    return url_for("users.index")


def local_path(target: str | None, prefix: str) -> str | None:
    """``target`` when it is a path of the panel under ``prefix`` that a redirect may carry
    (no ``//``, no ``\\``, no control character: CR or LF in a Location header is refused by
    the server, which turned a hand-made ``next`` into a 500 after the action was done)."""
    target = target or ""
    if (target.startswith(prefix) and "//" not in target and "\\" not in target
            and not _CONTROL.search(target)):
        return target
    return None


@bp.route("/login", methods=["GET", "POST"])
def login():
    form = LoginForm()
    if form.validate_on_submit():
        admin = db.session.scalar(select(Admin).where(Admin.email == form.email.data.lower()))
        if admin and verify_password(admin.password_hash, form.password.data):
            session.clear()  # nothing of the session before the login carries over
            login_user(admin)
            return redirect(_safe_next(request.args.get("next")))
        flash("Email or password is not correct.", "error")
    return render_template("login.html", form=form), 200 if request.method == "GET" else 400


@bp.post("/logout")
@login_required
def logout():
    """Ends this admin's sessions everywhere, so a copied session cookie stops working."""
    current_user.end_sessions()
    db.session.commit()
    logout_user()
    return redirect(url_for("auth.login"))
