"""The control panel: ``create_app()`` builds it from the shared configuration."""

from __future__ import annotations

import sys
from pathlib import Path

import redis
from flask import Flask, render_template, request
from flask_wtf.csrf import CSRFError
from sqlalchemy.exc import IntegrityError

from outgoing import redis_conn
from outgoing.config import ConfigError, known_settings, load_config
from outgoing.db import engine_options, install_sqlite_pragmas
from webapp.extensions import csrf, db, htmx, login_manager, migrate

MIGRATIONS = str(Path(__file__).resolve().parent.parent / "migrations")


def create_app(overrides: dict | None = None) -> Flask:
    overrides = dict(overrides or {})
    known = known_settings()
    flask_overrides = {k: overrides.pop(k) for k in list(overrides) if k not in known}
    try:
        config = load_config(overrides)
    except ConfigError as exc:
        print(f"outbound-guard: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    app = Flask(__name__, instance_path=config["INSTANCE_PATH"], instance_relative_config=True)
    app.config.update(config)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=config["DATABASE_URL"],
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(config["DATABASE_URL"]),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=config["PUBLIC_URL"].startswith("https://"),
        WTF_CSRF_TIME_LIMIT=None,
    )
    app.config.update(flask_overrides)
    Path(config["INSTANCE_PATH"]).mkdir(parents=True, exist_ok=True)

    db.init_app(app)
    with app.app_context():
        install_sqlite_pragmas(db.engine)
    migrate.init_app(app, db, directory=MIGRATIONS, render_as_batch=True)
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"
    login_manager.login_message_category = "info"
    csrf.init_app(app)
    htmx.init_app(app)
    app.extensions["og_redis"] = redis_conn.connect(config["REDIS_URL"],
                                                    rq_url=config["RQ_REDIS_URL"],
                                                    socket_timeout=5, socket_connect_timeout=5)

    from webapp import (
        address_confirmation,
        audit_log,
        auth,
        cli,
        converters,
        dkim_keys,
        domains,
        identities,
        lock_templates,
        ui,
        unlock,
        user_settings,
        users,
    )

    converters.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(users.bp)
    app.register_blueprint(user_settings.bp)
    app.register_blueprint(identities.bp)
    app.register_blueprint(domains.bp)
    app.register_blueprint(lock_templates.bp)
    app.register_blueprint(dkim_keys.bp)
    app.register_blueprint(audit_log.bp)
    app.register_blueprint(unlock.bp)
    app.register_blueprint(address_confirmation.bp)
    app.register_blueprint(__import__("webapp.auth_blocks", fromlist=["bp"]).bp)
    app.register_blueprint(__import__("webapp.quarantine", fromlist=["bp"]).bp)
    app.register_blueprint(__import__("webapp.archive", fromlist=["bp"]).bp)
    app.register_blueprint(__import__("webapp.message_log", fromlist=["bp"]).bp)
    app.register_blueprint(__import__("webapp.held_mail", fromlist=["bp"]).bp)
    app.register_blueprint(__import__("webapp.activity", fromlist=["bp"]).bp)
    app.register_blueprint(__import__("webapp.incident", fromlist=["bp"]).bp)
    app.register_blueprint(__import__("webapp.metrics", fromlist=["bp"]).bp)
    cli.init_app(app)
    ui.init_app(app)
    _error_pages(app)
    app.before_request(_refuse_nul)
    app.after_request(_security_headers)

    @app.get("/")
    def index():
        from flask import redirect, url_for

        return redirect(url_for("users.index"))

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app


# Every page runs only the panel's own script files: no inline script or handler, no eval
# (htmx's allowEval is off too). A domain admin's text shown to a super admin (a user's or a
# template's name) can then never run as script, even where an escaping slipped. Styles may
# be inline (htmx's indicator style, SVG attributes). A page with its own policy (the stored
# message view's stricter one) keeps it.
PANEL_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
             "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
             "frame-ancestors 'none'")


def _security_headers(response):
    response.headers.setdefault("Content-Security-Policy", PANEL_CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


def page(status: int, heading: str, message: str):
    """A clear page (or, for HTMX, a short text the page shows) instead of a bare error."""
    if request.headers.get("HX-Request"):
        return message, status
    return render_template("error.html", status=status, heading=heading,
                           message=message, title=heading), status


def _error_pages(app: Flask) -> None:
    """Clear pages instead of bare errors."""

    @app.errorhandler(404)
    def not_found(_exc):
        return page(404, "Not found", "There is nothing here, or it is not yours to see.")

    @app.errorhandler(CSRFError)
    def csrf_failed(_exc):
        return page(400, "Form expired", "The form was open too long or came from elsewhere. "
                                         "Reload the page and try again.")

    @app.errorhandler(redis.RedisError)
    def redis_down(exc):
        app.logger.error("Redis unavailable: %s", exc)
        return page(503, "Temporarily unavailable",
                    "Redis cannot be reached, so the change was not made. Try again shortly.")

    @app.errorhandler(IntegrityError)
    def changed_meanwhile(exc):
        """Two requests made the same change at once (the same identity, user or domain
        added twice): the database's unique key refused the second after its own check had
        passed. The second is told so, not given a 500. Any other integrity error is a
        fault, and stays one (a 500 with its traceback in the log)."""
        db.session.rollback()
        if not _unique_violation(exc):
            raise exc
        app.logger.warning("a change collided with another made at the same time: %s",
                           exc.orig)
        return page(409, "Changed meanwhile",
                    "The same change was being made at the same moment, by you in another "
                    "tab or by another admin, so this one was not made. Reload the page to "
                    "see what is there now.")


def _unique_violation(exc: IntegrityError) -> bool:
    """A duplicate row (PostgreSQL's SQLSTATE 23505, SQLite's UNIQUE constraint), not a
    missing value or a broken reference."""
    state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    if state is not None:
        return state == "23505"
    return "UNIQUE constraint failed" in str(exc.orig)


def _refuse_nul():
    """A NUL character in the address, a query argument or a form field is refused (400)
    before any page sees it: no value of the panel may hold one, and PostgreSQL cannot
    store one in text (an error, hence a 500, wherever such a value reached a query, even
    the login form's). Other control characters are left to each field's own check, which
    says which field is wrong (an identity is one line of printable text, for instance)."""
    values = [request.path]
    for multi in (request.args, request.form):
        for key, value in multi.items(multi=True):
            values += (key, value)
    if any("\0" in value for value in values):
        return page(400, "Not accepted", "The request holds a NUL character (\\0), which "
                                         "no field accepts. Remove it and try again.")
    return None
