"""Addresses outside a domain that its notices may go to (``outgoing.notify_addresses``):
asking for the confirmation when a domain admin names one, and the link's page.

The link is opened by whoever reads that mailbox, who may have no login here: the page asks
nothing but a press of the button (a GET confirms nothing, as mail scanners follow links).
"""

from __future__ import annotations

import redis
from flask import Blueprint, current_app, render_template, request
from flask_login import current_user
from flask_wtf import FlaskForm

from outgoing import audit, jobs, notify_addresses
from outgoing.models import Domain
from outgoing.tokens import InvalidUnlockToken, read_confirm_token
from webapp.extensions import db
from webapp.services import redis_client

bp = Blueprint("address_confirmation", __name__)

NOT_VALID = (400, "This confirmation link is not valid",
             "The link is incomplete or was changed. Copy the whole link from the message.")
REFUSALS = {
    "tampered": NOT_VALID,
    "invalid": NOT_VALID,
    "expired": (410, "This confirmation link has expired",
                "Confirmation links work for 7 days. Ask the domain's administrator to save "
                "the address again for a new link."),
    "missing": (404, "Nothing to confirm", "The domain of this link no longer exists."),
}


class ConfirmAddressForm(FlaskForm):
    """Carries only the CSRF token: confirming is the whole input."""


def unconfirmed(domain: Domain, address: str | None) -> str | None:
    """``address`` when it is set and the domain's notices may not go to it yet."""
    if not address or not address.strip():
        return None
    return None if notify_addresses.may_notify(db.session, domain, address) else address


def request_confirmation(domain: Domain, address: str | None, typed: bool) -> str | None:
    """After a save naming ``address`` for the domain's notices: an address a super admin
    ``typed`` in this very save is the provider's choice and counts as confirmed; any other
    outside address is mailed the link. A super admin's save that leaves an address a domain
    admin chose as it was confirms nothing: else any unrelated save by the provider would
    send a customer's notices to an outsider who never agreed. What to tell the admin, or
    None."""
    address = unconfirmed(domain, address)
    if address is None:
        return None
    if current_user.is_super and typed:
        notify_addresses.confirm(db.session, domain.id, address)
        db.session.commit()
        return None
    try:
        jobs.enqueue(redis_client(), "worker.jobs.send_address_confirmation", domain.id,
                     address)
    except redis.RedisError as exc:
        current_app.logger.warning("could not ask %s for a confirmation: %s", address, exc)
        return (f"{address} is not confirmed, and the link could not be mailed just now; "
                "save again in a moment.")
    return (f"We mailed {address} a link to confirm it. Until someone there confirms, no "
            "abuse report, alert or notice is sent to it.")


@bp.route("/confirm-address/<token>", methods=["GET", "POST"])
def confirm(token: str):
    try:
        claim = read_confirm_token(current_app.config["SECRET_KEY"], token)
    except InvalidUnlockToken as exc:
        return _refuse(exc.reason)
    domain = db.session.get(Domain, claim.domain_id)
    if domain is None:
        return _refuse("missing")
    form = ConfirmAddressForm()
    if request.method == "POST" and form.validate_on_submit():
        if notify_addresses.confirm(db.session, domain.id, claim.address):
            audit.record(db.session, actor=claim.address, action="confirm",
                         target_type="domain", target_id=domain.id, domain_id=domain.id,
                         name=domain.name, address=claim.address)
        db.session.commit()
        return render_template("confirm_address/done.html", domain=domain,
                               address=claim.address, title="Confirmed")
    already = notify_addresses.is_confirmed(db.session, domain.id, claim.address)
    return render_template("confirm_address/confirm.html", domain=domain, form=form,
                           address=claim.address, already=already,
                           title="Confirm this address?"), \
        200 if request.method == "GET" else 400


def _refuse(reason: str):
    status, title, text = REFUSALS[reason]
    return render_template("confirm_address/refused.html", title=title, text=text), status
