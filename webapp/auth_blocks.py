"""Outgoing > Blocked Logins: client addresses and usernames the SMTP proxy blocks after too
many failed AUTH attempts, and the button that lifts a block at once.

A super admin sees every block; a domain admin sees only usernames of their own domain
(their outgoing users, or any address at the domain) and never client addresses, which
belong to no domain.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import select

from outgoing import audit
from outgoing.auth_blocks import IP, USER, AuthBlock, clear_block, list_blocks, split_subject
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


def _when(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.get("")
@login_required
def index():
    now = time.time()
    blocks = _visible(list_blocks(redis_client(), now))
    return render_template("auth_blocks.html", blocks=blocks, now=now, when=_when,
                           IP=IP, title="Blocked Logins")


@bp.post("/clear")
@login_required
def clear():
    subject = request.form.get("subject", "")[:400]
    if not RowActionForm().validate_on_submit():
        abort(400)
    matches = [(b, d) for b, d in _visible(list_blocks(redis_client(), time.time()))
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
