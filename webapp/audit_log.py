"""The Audit log page: who changed what, when, with the before and after values."""

from __future__ import annotations

import json

from flask import Blueprint, render_template, request
from flask_login import current_user, login_required
from sqlalchemy import select

from outgoing import listing
from outgoing.models import Domain, Identity, OutgoingUser
from webapp import scope
from webapp.extensions import db, htmx

bp = Blueprint("audit_log", __name__)


def _names(events) -> dict[tuple[str, int], str]:
    """Display names of the users and identities on a page: one query per kind."""
    wanted: dict[str, set[int]] = {"user": set(), "identity": set(), "domain": set()}
    for event in events:
        if event.target_type in wanted and event.target_id is not None:
            wanted[event.target_type].add(event.target_id)
    names = {}
    for kind, model, column in (("user", OutgoingUser, OutgoingUser.name),
                                ("identity", Identity, Identity.value),
                                ("domain", Domain, Domain.name)):
        if wanted[kind]:
            for row_id, name in db.session.execute(
                    select(model.id, column).where(model.id.in_(wanted[kind]))):
                names[(kind, row_id)] = name
    return names


def _entries(events):
    names = _names(events)
    domain_ids = {e.domain_id for e in events if e.domain_id}
    domains = dict(db.session.execute(select(Domain.id, Domain.name)
                                      .where(Domain.id.in_(domain_ids))).all())
    for event in events:
        try:
            detail = json.loads(event.detail or "{}")
        except ValueError:
            detail = {"detail": event.detail}
        name = detail.pop("name", None) or names.get((event.target_type, event.target_id))
        domain = domains.get(event.domain_id, "")
        readable = _readable(detail)
        if not current_user.is_super:
            readable = _for_domain_admin(readable, domain)
        yield dict(event=event, detail=readable, name=name or f"#{event.target_id}",
                   domain=domain)


HIDDEN = {"lock_id"}  # internal ids that mean nothing to a reader
# Details that name other domains, which only the provider may read: the other customers'
# ranges a super admin's confirmed overlap lets a new range cover.
SUPER_ONLY = {"overlap_confirmed"}


def _for_domain_admin(detail: dict, own_domain: str) -> dict:
    """An event of their domain as a domain admin may read it: without another domain's
    names. The events keep them (the provider's record), so this is done when showing them,
    which also covers rows written before this rule."""
    detail = {k: v for k, v in detail.items() if k not in SUPER_ONLY}
    moved = detail.get("changes", {}).get("domain")
    if isinstance(moved, list):  # a user the provider moved in from another domain
        detail["changes"] = dict(detail["changes"], domain=[
            name if name in (None, own_domain) else "another domain" for name in moved])
    return detail


def _readable(detail: dict) -> dict:
    """Before/after snapshots as one table of changes; everything else as key: value."""
    changes = dict(detail.pop("changes", None) or {})
    before, after = detail.pop("before", None), detail.pop("after", None)
    if isinstance(after, dict):
        changes.update({k: [None, v] for k, v in after.items()})
    if isinstance(before, dict):
        changes.update({k: [v, None] for k, v in before.items()})
    elif before is not None:
        detail["before"] = before
    readable = {k: v for k, v in detail.items() if k not in HIDDEN}
    if changes:
        readable["changes"] = changes
    return readable


@bp.get("/audit")
@login_required
def index():
    page = listing.audit_page(db.session, domain_id=scope.domain_id(),
                              after=request.args.get("after"))
    context = dict(page=page, entries=list(_entries(page.rows)), title="Audit log")
    if htmx and htmx.target == "audit-list":
        return render_template("_partials/audit_list.html", **context)
    return render_template("audit/index.html", **context)
