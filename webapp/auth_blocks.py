"""Outgoing > Blocked Logins: client addresses and usernames the SMTP proxy blocks after too
many failed AUTH attempts, and the button that lifts a block at once. Each row says which
logins its block refuses: all from an address, or a username's from networks it has not
logged in from lately (those networks are listed, so an admin sees the owner is not locked
out).

A super admin sees every block; a domain admin sees only usernames of their own domain
(their outgoing users, or any address at the domain) and never client addresses, which
belong to no domain.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required
from sqlalchemy import select

from outgoing import audit
from outgoing.auth_blocks import (
    IP,
    USER,
    AuthBlock,
    clear_block,
    list_blocks,
    scope,
    split_subject,
)
from outgoing.models import KIND_DOMAIN, KIND_USER, Domain, OutgoingUser
from webapp.extensions import db, htmx
from webapp.forms.users import RowActionForm
from webapp.services import actor, redis_client

bp = Blueprint("auth_blocks", __name__, url_prefix="/outgoing/blocked-logins")


def _owners(usernames: set[str]) -> dict[str, int]:
    """Domain id of each username that is an Authenticating User or Domain."""
    if not usernames:
        return {}
    rows = db.session.execute(select(OutgoingUser.name, OutgoingUser.domain_id).where(
        OutgoingUser.kind.in_((KIND_USER, KIND_DOMAIN)), OutgoingUser.name.in_(usernames)))
    return {name: domain_id for name, domain_id in rows}


def _domain_of(username: str, owners: dict[str, int], own_domain: Domain | None) -> int | None:
    if username in owners:
        return owners[username]
    if own_domain is not None and (username == own_domain.name
                                   or username.endswith("@" + own_domain.name)):
        return own_domain.id
    return None


def _visible(blocks: list[AuthBlock]) -> list[tuple[AuthBlock, int | None]]:
    """The blocks this admin may see, each with the domain it belongs to (None: none)."""
    own = None if current_user.is_super else current_user.domain
    owners = _owners({b.value for b in blocks if b.kind == USER})
    shown = []
    for block in blocks:
        domain_id = _domain_of(block.value, owners, own) if block.kind == USER else None
        if current_user.is_super or (domain_id is not None
                                     and domain_id == current_user.domain_id):
            shown.append((block, domain_id))
    return shown


def _known_network_days() -> float:
    return float(current_app.config.get("AUTH_KNOWN_NETWORK_DAYS") or 0)


def _blocks(now: float) -> list[AuthBlock]:
    return list_blocks(redis_client(), now, known_network_days=_known_network_days())


def _when(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.get("")
@login_required
def index():
    now = time.time()
    blocks = _visible(_blocks(now))
    return render_template("auth_blocks.html", blocks=blocks, now=now, when=_when,
                           IP=IP, scope=scope, known_network_days=_known_network_days(),
                           title="Blocked Logins")


@bp.post("/clear")
@login_required
def clear():
    subject = request.form.get("subject", "")[:400]
    if not RowActionForm().validate_on_submit():
        abort(400)
    matches = [(b, d) for b, d in _visible(_blocks(time.time()))
               if b.subject == subject]
    if not matches:
        abort(404)  # not blocked, or not this admin's to see
    block, domain_id = matches[0]
    clear_block(redis_client(), subject)
    kind, value = split_subject(subject)
    audit.record(db.session, actor=actor(), action="clear_auth_block", target_type="auth_block",
                 target_id=None, domain_id=domain_id, subject=subject, kind=kind, value=value,
                 failures=block.failures)
    db.session.commit()
    label = "address" if kind == IP else "username"
    if htmx:
        return ""
    flash(f"Cleared the block of the {label} {value}.", "success")
    return redirect(url_for("auth_blocks.index"))
