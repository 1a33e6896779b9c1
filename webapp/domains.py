"""Domains (admin level only) and Outgoing > Settings of one domain.

A super admin adds the customer domains here (the ``flask create-domain`` command does the
same); each domain's settings hold the administrator's contact that receives abuse reports
and lock alerts.
"""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import select

from outgoing import audit, held, listing
from outgoing.ids import parse_id
from outgoing.models import Domain
from webapp import scope
from webapp.address_confirmation import request_confirmation, unconfirmed
from webapp.extensions import db, htmx
from webapp.forms.domains import (
    DETECTION_DEFAULT_HELP,
    SETTINGS_HELP,
    DetectionDefaultForm,
    DomainForm,
    DomainSettingsForm,
)
from webapp.services import actor, announce_change

bp = Blueprint("domains", __name__)

PICKER_LIMIT = 2000


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


def to_domain_page(endpoint: str, *, area: str, lead: str):
    """Outgoing > Settings and DKIM belong to one domain: a domain admin goes straight to
    theirs, and so does a super admin when there is only one; with several, the super admin
    picks one on the page itself rather than being sent to the Domains list. ``?domain=<id>``
    (the picker's GET form) opens that domain, scoped like every id (404 if not visible)."""
    picked = request.args.get("domain", "")
    if picked:
        picked_id = parse_id(picked)
        if picked_id is None:
            abort(404)
        return redirect(url_for(endpoint, domain_id=scope.domain_or_404(picked_id).id))
    if not current_user.is_super:
        return redirect(url_for(endpoint, domain_id=current_user.domain_id))
    domains = scope.visible_domains(limit=PICKER_LIMIT)
    if len(domains) == 1:
        return redirect(url_for(endpoint, domain_id=domains[0].id))
    if not domains:
        flash("Add a domain first.", "info")
        return redirect(url_for("domains.index"))
    return render_template("domains/pick.html", area=area, lead=lead,
                           picker_domains=domains, picker_action=request.path,
                           current_domain=None, title=area)


def picker_context(domain: Domain) -> dict:
    """The domain picker shown on a per-domain page to a super admin with several domains."""
    if not current_user.is_super:
        return {"picker_domains": []}
    domains = scope.visible_domains(limit=PICKER_LIMIT)
    return {"picker_domains": domains if len(domains) > 1 else [], "current_domain": domain}


@bp.get("/outgoing/settings")
@login_required
def own_settings():
    return to_domain_page("domains.settings", area="Settings",
                          lead="Where abuse reports and lock alerts of a domain go.")


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
            asked = request_confirmation(domain, domain.abuse_report_address,
                                         typed="abuse_report_address" in changes)
            if asked:
                flash(asked, "info")
            return redirect(url_for("domains.settings", domain_id=domain.id))
        status = 400
    return render_template("domains/settings.html", domain=domain, form=form,
                           help=SETTINGS_HELP, title=f"Settings of {domain.name}",
                           unconfirmed=unconfirmed(domain, domain.abuse_report_address),
                           detection_form=_detection_form(),
                           detection_help=DETECTION_DEFAULT_HELP,
                           picker_action=url_for("domains.own_settings"),
                           **picker_context(domain)), status


def _detection_form():
    if not current_user.is_super:
        return None
    form = DetectionDefaultForm(formdata=None)
    form.detection_default.data = held.detection_default(db.session)
    return form


@bp.post("/outgoing/settings/detection-default")
@login_required
def detection_default():
    """Compromise detection for new users, provider-wide: super admins only (404 else)."""
    if not current_user.is_super:
        abort(404)
    form = DetectionDefaultForm()
    back = request.form.get("domain_id", "")
    if form.validate_on_submit():
        before = held.set_detection_default(db.session, form.detection_default.data)
        if before is not None:
            audit.record(db.session, actor=actor(), action="update", target_type="settings",
                         target_id=None, domain_id=None, name="detection_default",
                         changes={"detection_default": [before, form.detection_default.data]})
        db.session.commit()
        flash("Saved." if before is not None else "Saved (nothing had changed).", "success")
    else:
        flash("Choose one of the offered defaults.", "error")
    back_id = parse_id(back)
    if back_id is not None:
        return redirect(url_for("domains.settings", domain_id=back_id))
    return redirect(url_for("domains.own_settings"))
