"""Download incident pack: the lock alert's pack as a .zip (``summary.json`` plus sample
messages as .eml), for an outgoing user or an identity.

Scoped like every page: another domain's user or identity is a 404, and the pack itself
holds nothing but that sender's rows in its own domain (``outgoing/incident.py``).
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app
from flask_login import login_required

from outgoing import incident
from outgoing.models import utcnow
from webapp import scope
from webapp.downloads import attachment
from webapp.extensions import db

bp = Blueprint("incident", __name__)


def _download(target, name: str) -> Response:
    config = current_app.config
    pack = incident.build(db.session, target, now=utcnow(), public_url=config["PUBLIC_URL"],
                          spam_window_seconds=config["SPAM_WINDOW_SECONDS"])
    data = incident.zip_pack(db.session, config, target, pack)
    response = attachment(data, "application/zip",
                          f"incident-{name[:80]}-{pack.generated_at:%Y%m%d-%H%M}.zip")
    response.headers["Cache-Control"] = "no-store"
    return response


def user_pack(target_id: int):
    user = scope.outgoing_user_or_404(target_id)
    return _download(user, user.name)


def identity_pack(target_id: int):
    identity = scope.identity_or_404(target_id)
    return _download(identity, identity.value)


# The paths live in outgoing/incident.py, where the worker builds the alert's link too.
for _kind, _view in (("user", user_pack), ("identity", identity_pack)):
    bp.add_url_rule(incident.PACK_PATHS[_kind].format(id="<int:target_id>"),
                    endpoint=f"{_kind}_pack", view_func=login_required(_view),
                    methods=["GET"])
