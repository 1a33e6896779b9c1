"""Logging in and out of the control panel."""

import math
import re
from urllib.parse import urlsplit

import redis
from flask import (
    Blueprint,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_login import current_user, login_required, login_user, logout_user
from sqlalchemy import select

from outgoing.ids import parse_id
from outgoing.models import Admin
from outgoing.passwords import stand_in_hash, verify_password
from webapp import login_throttle
from webapp.extensions import db, login_manager
from webapp.forms.auth import LoginForm
from webapp.services import redis_client

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
        email = form.email.data.strip().lower()
        client_ip = login_throttle.client_address()
        attempt = _throttle(login_throttle.begin, client_ip, email)
        if isinstance(attempt, int):
            flash(f"Too many failed logins. Try again in {max(1, math.ceil(attempt / 60))} "
                  "minute(s).", "error")
            return render_template("login.html", form=form), 429
        admin = db.session.scalar(select(Admin).where(Admin.email == email))
        # An unknown email costs a password check too, so the time of a refusal does not
        # tell which admin accounts exist.
        if verify_password(admin.password_hash if admin else stand_in_hash(),
                           form.password.data) and admin is not None:
            if attempt is not None:
                _throttle(login_throttle.record_success, client_ip, email, attempt)
            session.clear()  # nothing of the session before the login carries over
            login_user(admin)
            return redirect(_safe_next(request.args.get("next")))
        if attempt is not None:
            _throttle(login_throttle.record_failure, attempt)
        flash("Email or password is not correct.", "error")
    return render_template("login.html", form=form), 200 if request.method == "GET" else 400


def _throttle(step, *args):
    """One step of the login throttle; with Redis unreachable, logins still work."""
    try:
        return step(redis_client(), *args)
    except redis.RedisError as exc:
        current_app.logger.warning("login throttle: Redis unavailable: %s", exc)
        return None


@bp.post("/logout")
@login_required
def logout():
    """Ends this admin's sessions everywhere, so a copied session cookie stops working."""
    current_user.end_sessions()
    db.session.commit()
    logout_user()
    return redirect(url_for("auth.login"))
