"""Logging in and out of the control panel."""

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import login_required, login_user, logout_user
from sqlalchemy import select

from outgoing.models import Admin
from outgoing.passwords import verify_password
from webapp.extensions import db, login_manager
from webapp.forms.auth import LoginForm

bp = Blueprint("auth", __name__)


@login_manager.user_loader
def load_admin(admin_id: str):
    return db.session.get(Admin, int(admin_id)) if admin_id.isdigit() else None


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/") and not target.startswith("//"):
        return target
    return url_for("users.index")


@bp.route("/login", methods=["GET", "POST"])
def login():
    form = LoginForm()
    if form.validate_on_submit():
        admin = db.session.scalar(select(Admin).where(Admin.email == form.email.data.lower()))
        if admin and verify_password(admin.password_hash, form.password.data):
            login_user(admin)
            return redirect(_safe_next(request.args.get("next")))
        flash("Email or password is not correct.", "error")
    return render_template("login.html", form=form), 200 if request.method == "GET" else 400


@bp.post("/logout")
@login_required
def logout():
    logout_user()
    return redirect(url_for("auth.login"))
