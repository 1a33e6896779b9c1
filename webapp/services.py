"""What routes need besides the database: Redis, and the acting admin's name for audits."""

from flask import current_app, flash
from flask_login import current_user

from outgoing.changes import announce_config_change


def redis_client():
    return current_app.extensions["og_redis"]


def actor() -> str:
    return getattr(current_user, "email", "system")


def announce_change() -> None:
    """Tell the proxies; if Redis is down they still pick it up on their periodic reload."""
    try:
        announce_config_change(redis_client())
    except Exception as exc:  # the change is saved; only the push failed
        current_app.logger.warning("could not announce configuration change: %s", exc)
        flash("Saved. The SMTP proxies will pick this change up within a minute.", "info")
