"""Lock Templates: the notice a sender receives when their outgoing mail is locked.

Templates are untrusted text rendered in a Jinja sandbox (``outgoing.lock_templates``); one
that does not render is a form error here, and at send time the default is used instead.
Shared templates (no domain) are written by super admins and readable by every domain.
"""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import func, select

from outgoing import audit
from outgoing import lock_templates as rendering
from outgoing.models import Domain, LockTemplate, OutgoingUser
from webapp import scope
from webapp.extensions import db, htmx
from webapp.forms.lock_templates import HELP, LockTemplateForm
from webapp.forms.users import RowActionForm
from webapp.services import actor, announce_change

bp = Blueprint("lock_templates", __name__, url_prefix="/outgoing/lock-templates")


def _fields(template: LockTemplate) -> dict:
    return {"name": template.name, "subject": template.subject, "body": template.body,
            "domain": db.session.get(Domain, template.domain_id).name
            if template.domain_id else ""}


def _preview(subject: str, body: str):
    problem = rendering.validate_template(subject, body)
    rendered = rendering.render_lock_template(subject, body, rendering.SAMPLE_CONTEXT)
    return problem, rendered


@bp.get("")
@login_required
def index():
    templates = list(db.session.scalars(scope.lock_templates_query()))
    used = dict(db.session.execute(
        scope.restrict(select(OutgoingUser.lock_template_id, func.count()), OutgoingUser)
        .where(OutgoingUser.lock_template_id.is_not(None))
        .group_by(OutgoingUser.lock_template_id)).all())
    domain_ids = {t.domain_id for t in templates if t.domain_id}
    domain_names = dict(db.session.execute(
        select(Domain.id, Domain.name).where(Domain.id.in_(domain_ids))).all())
    return render_template("lock_templates/index.html", templates=templates, used=used,
                           domain_names=domain_names,
                           title="Lock Templates", action_form=RowActionForm())


def _editable(template: LockTemplate | None) -> bool:
    return template is None or current_user.is_super or (
        template.domain_id == current_user.domain_id)


def _users_outside(template: LockTemplate, domain_id: int) -> int:
    """How many users of other domains than ``domain_id`` use ``template``, in every domain:
    moved to one domain, the template is that domain admin's to rewrite, and other
    customers' senders would get the notice they wrote."""
    return db.session.scalar(select(func.count()).select_from(OutgoingUser).where(
        OutgoingUser.lock_template_id == template.id, OutgoingUser.domain_id != domain_id))


def _save(form: LockTemplateForm, template: LockTemplate | None):
    """Validate and store; returns the template, or None with errors on the form."""
    if not form.validate_on_submit():
        return None
    problem = rendering.validate_template(form.subject.data, form.body.data)
    if problem:
        field = form.subject if problem.startswith("Subject") else form.body
        field.errors = [*field.errors, problem]
        return None
    domain_id = None if current_user.is_super else current_user.domain_id
    if (form.domain.data or "").strip():  # a domain admin naming another domain: 404
        try:
            domain_id = scope.domain_named(form.domain.data).id
        except ValueError as exc:
            form.domain.errors = [*form.domain.errors, str(exc)]
            return None
    if template is not None and domain_id is not None and domain_id != template.domain_id:
        outside = _users_outside(template, domain_id)
        if outside:
            name = db.session.get(Domain, domain_id).name
            form.domain.errors = [*form.domain.errors, (
                f"{outside} user{'s' if outside != 1 else ''} outside {name} "
                f"use{'' if outside != 1 else 's'} this template; choose another lock "
                "template for them first.")]
            return None
    creating = template is None
    before = _fields(template) if template else {}
    if creating:
        template = LockTemplate()
        db.session.add(template)
    template.name = form.name.data.strip()
    template.subject = form.subject.data or ""
    template.body = form.body.data or ""
    template.domain_id = domain_id
    db.session.flush()
    db.session.refresh(template)
    after = _fields(template)
    if creating:
        changes = {k: [None, v] for k, v in after.items() if v}
    else:
        changes = {k: [before[k], v] for k, v in after.items() if before[k] != v}
    if changes:
        audit.record(db.session, actor=actor(), action="create" if creating else "update",
                     target_type="lock_template", target_id=template.id,
                     domain_id=template.domain_id, name=template.name, changes=changes)
    db.session.commit()
    if changes and not creating:
        announce_change()
    return template


def _render_form(form, template, status=200):
    problem, rendered = _preview(form.subject.data, form.body.data)
    return render_template("lock_templates/edit.html", form=form, template=template,
                           help=HELP, placeholders=rendering.PLACEHOLDERS,
                           sample=rendering.SAMPLE_CONTEXT, rendered=rendered, problem=problem,
                           editable=_editable(template),
                           title=(f"Lock template: {template.name}" if template
                                  else "New lock template")), status


@bp.route("/new", methods=["GET", "POST"])
@login_required
def new():
    form = LockTemplateForm()
    if request.method == "GET":
        form.subject.data = rendering.DEFAULT_SUBJECT
        form.body.data = rendering.DEFAULT_BODY
        return _render_form(form, None)
    template = _save(form, None)
    if template is None:
        return _render_form(form, None, 400)
    flash(f"Created the lock template {template.name}. Choose it as Lock Template in a "
          "user's settings.", "success")
    return redirect(url_for("lock_templates.edit", template_id=template.id))


@bp.route("/<int:template_id>", methods=["GET", "POST"])
@login_required
def edit(template_id: int):
    template = scope.lock_template_or_404(template_id, editable=request.method == "POST")
    if request.method == "GET":
        form = LockTemplateForm(formdata=None, data=_fields(template))
        return _render_form(form, template)
    form = LockTemplateForm()
    if _save(form, template) is None:
        return _render_form(form, template, 400)
    flash("Saved.", "success")
    return redirect(url_for("lock_templates.edit", template_id=template.id))


@bp.post("/preview")
@login_required
def preview():
    """Render subject and body with sample values (HTMX, as the template is typed)."""
    form = LockTemplateForm()
    form.validate_on_submit()
    if form.csrf_token.errors:
        abort(400)
    problem, rendered = _preview(form.subject.data, form.body.data)
    template = "_partials/lock_template_preview.html"
    if not htmx:
        abort(400)
    return render_template(template, problem=problem, rendered=rendered)


@bp.post("/<int:template_id>/delete")
@login_required
def delete(template_id: int):
    template = scope.lock_template_or_404(template_id, editable=True)
    if not RowActionForm().validate_on_submit():
        abort(400)
    audit.record(db.session, actor=actor(), action="delete", target_type="lock_template",
                 target_id=template.id, domain_id=template.domain_id, name=template.name,
                 before=_fields(template))
    db.session.delete(template)
    db.session.commit()
    announce_change()
    flash(f"Deleted the lock template {template.name}; its users get the default template.",
          "success")
    return redirect(url_for("lock_templates.index"))
