"""Domains (admin level only) and Outgoing > Settings of one domain.

A super admin adds the customer domains here (the ``flask create-domain`` command does the
same); each domain's settings hold the administrator's contact that receives abuse reports
and lock alerts.
"""

from __future__ import annotations

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import select

from outgoing import audit, listing
from outgoing.models import Domain
from webapp import scope
from webapp.extensions import db, htmx
from webapp.forms.domains import SETTINGS_HELP, DomainForm, DomainSettingsForm
from webapp.services import actor, announce_change

bp = Blueprint("domains", __name__)


def _list_context(form: DomainForm | None = None) -> dict:
    search = request.args.get("q", "").strip()[:listing.MAX_SEARCH]
    page = listing.domains_page(db.session, search=search, after=request.args.get("after"),
                                before=request.args.get("before"))
    counts = listing.user_counts(db.session, [d.id for d in page.rows])
    return dict(page=page, domains=page.rows, counts=counts, search=search,
                form=form or DomainForm(), title="Domains")


@bp.get("/domains")
@login_required
def index():
    scope.require_super()
    context = _list_context()
    if htmx and htmx.target == "domain-list":
        return render_template("_partials/domain_list.html", **context)
    return render_template("domains/index.html", **context)


@bp.post("/domains")
@login_required
def add():
    scope.require_super()
    form = DomainForm()
    if form.validate_on_submit():
        if db.session.scalar(select(Domain.id).where(Domain.name == form.name.data)):
            form.name.errors.append(f"{form.name.data} is already a domain.")
        else:
            domain = Domain(name=form.name.data)
            db.session.add(domain)
            db.session.flush()
            audit.record(db.session, actor=actor(), action="create", target_type="domain",
                         target_id=domain.id, domain_id=domain.id, name=domain.name,
                         after={"name": domain.name})
            db.session.commit()
            announce_change()
            flash(f"Added the domain {domain.name}. Set its abuse report address next.",
                  "success")
            return redirect(url_for("domains.settings", domain_id=domain.id))
    return render_template("domains/index.html", **_list_context(form)), 400


@bp.get("/outgoing/settings")
@login_required
def own_settings():
    """Outgoing > Settings: a domain admin's own domain; a super admin picks a domain."""
    if current_user.is_super:
        flash("Choose the domain whose settings you want to change.", "info")
        return redirect(url_for("domains.index"))
    return redirect(url_for("domains.settings", domain_id=current_user.domain_id))


@bp.route("/outgoing/settings/<int:domain_id>", methods=["GET", "POST"])
@login_required
def settings(domain_id: int):
    domain = scope.domain_or_404(domain_id)
    form = DomainSettingsForm(obj=domain)
    status = 200
    if request.method == "POST":
        if form.validate_on_submit():
            before = {"abuse_report_address": domain.abuse_report_address,
                      "quarantine_report_enabled": domain.quarantine_report_enabled}
            after = {"abuse_report_address": form.abuse_report_address.data,
                     "quarantine_report_enabled": bool(form.quarantine_report_enabled.data)}
            changes = {k: [before[k], after[k]] for k in after if before[k] != after[k]}
            if changes:
                domain.abuse_report_address = after["abuse_report_address"]
                domain.quarantine_report_enabled = after["quarantine_report_enabled"]
                audit.record(db.session, actor=actor(), action="update",
                             target_type="domain", target_id=domain.id, domain_id=domain.id,
                             name=domain.name, changes=changes)
                db.session.commit()
                announce_change()
            flash("Saved." if changes else "Saved (nothing had changed).", "success")
            return redirect(url_for("domains.settings", domain_id=domain.id))
        status = 400
    return render_template("domains/settings.html", domain=domain, form=form,
                           help=SETTINGS_HELP, title=f"Settings of {domain.name}"), status
