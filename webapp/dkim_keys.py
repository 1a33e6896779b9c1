"""DKIM: generate a signing key per selector and show the TXT record to publish.

The private key is stored for the proxy and never shown; the public half is shown as the
exact record for ``<selector>._domainkey.<domain>``. The selectors listed here are the
choices of the "DKIM Selector" setting.
"""

from __future__ import annotations

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
from flask_login import login_required
from sqlalchemy import func, select

from outgoing import audit, dkim
from outgoing.config import dns_resolvers
from outgoing.ids import parse_id
from outgoing.models import DKIM_DEFAULT, DkimKey, OutgoingUser, utcnow
from webapp import scope
from webapp.domains import picker_context, to_domain_page
from webapp.extensions import db
from webapp.forms.dkim import HELP, DkimKeyForm
from webapp.forms.users import RowActionForm
from webapp.services import actor, announce_change

bp = Blueprint("dkim_keys", __name__, url_prefix="/outgoing/dkim")


def record_of(key: DkimKey, domain_name: str) -> tuple[str, str]:
    pair = dkim.DkimKeyPair(private_pem="", public_b64=key.public_key_b64,
                            algorithm=key.algorithm)
    return dkim.txt_record(key.selector, domain_name, pair)


@bp.get("")
@login_required
def own():
    return to_domain_page("dkim_keys.index", area="DKIM",
                          lead="Signing keys and the TXT records to publish, per domain.")


def default_selector() -> str:
    return current_app.config["DKIM_DEFAULT_SELECTOR"]


def _ensure_default_key(domain) -> None:
    """The provider's default selector gets its key in this domain on first use: when the
    domain's DKIM page is first opened, so the record can be published."""
    if dkim.ensure_default_key(db.session, domain, default_selector()):
        db.session.commit()
        announce_change()


def _render(domain, form: DkimKeyForm, status: int = 200, created: int | None = None):
    keys = list(db.session.scalars(select(DkimKey).where(DkimKey.domain_id == domain.id)
                                   .order_by(DkimKey.selector)))
    in_use = dict(db.session.execute(
        select(OutgoingUser.dkim_selector, func.count())
        .where(OutgoingUser.domain_id == domain.id, OutgoingUser.dkim_selector.is_not(None))
        .group_by(OutgoingUser.dkim_selector)).all())
    if default_selector():
        in_use[default_selector()] = (in_use.get(default_selector(), 0)
                                      + in_use.get(DKIM_DEFAULT, 0))
    rows = [(key, *record_of(key, domain.name), in_use.get(key.selector, 0)) for key in keys]
    return render_template("dkim/index.html", domain=domain, form=form, rows=rows, help=HELP,
                           created=created, action_form=RowActionForm(),
                           default_selector=default_selector(),
                           title=f"DKIM keys of {domain.name}",
                           picker_action=url_for("dkim_keys.own"),
                           **picker_context(domain)), status


@bp.route("/<int:domain_id>", methods=["GET", "POST"])
@login_required
def index(domain_id: int):
    domain = scope.domain_or_404(domain_id)
    form = DkimKeyForm()
    if request.method == "GET":
        _ensure_default_key(domain)
        return _render(domain, form, created=parse_id(request.args.get("created")))
    if not form.validate_on_submit():
        return _render(domain, form, 400)
    if db.session.scalar(select(DkimKey.id).where(DkimKey.domain_id == domain.id,
                                                  DkimKey.selector == form.selector.data)):
        form.selector.errors.append(f"{domain.name} already has a key for the selector "
                                    f"{form.selector.data}; choose another selector.")
        return _render(domain, form, 400)
    pair = dkim.generate_key(form.algorithm.data)
    key = DkimKey(domain_id=domain.id, selector=form.selector.data, algorithm=pair.algorithm,
                  private_key_pem=pair.private_pem, public_key_b64=pair.public_b64)
    db.session.add(key)
    db.session.flush()
    name, _value = dkim.txt_record(key.selector, domain.name, pair)
    audit.record(db.session, actor=actor(), action="create", target_type="dkim_key",
                 target_id=key.id, domain_id=domain.id, name=name,
                 after={"selector": key.selector, "algorithm": key.algorithm})
    db.session.commit()
    announce_change()
    flash(f"Created a key for {key.selector}. Publish the TXT record below at {name}, then "
          "choose the selector in the users' DKIM Selector setting.", "success")
    return redirect(url_for("dkim_keys.index", domain_id=domain.id, created=key.id))


@bp.post("/keys/<int:key_id>/delete")
@login_required
def delete(key_id: int):
    key = scope.dkim_key_or_404(key_id)
    if not RowActionForm().validate_on_submit():
        abort(400)
    if key.selector == default_selector():
        flash(f"{key.selector} is the default selector of every domain; its key cannot be "
              "deleted.", "error")
        return redirect(url_for("dkim_keys.index", domain_id=key.domain_id))
    users = db.session.scalar(select(func.count()).select_from(OutgoingUser).where(
        OutgoingUser.domain_id == key.domain_id, OutgoingUser.dkim_selector == key.selector))
    if users:
        flash(f"{users} outgoing user(s) sign with {key.selector}; choose another DKIM "
              "Selector for them first.", "error")
        return redirect(url_for("dkim_keys.index", domain_id=key.domain_id))
    audit.record(db.session, actor=actor(), action="delete", target_type="dkim_key",
                 target_id=key.id, domain_id=key.domain_id, name=key.selector,
                 before={"selector": key.selector, "algorithm": key.algorithm})
    db.session.delete(key)
    db.session.commit()
    announce_change()
    flash(f"Deleted the key of {key.selector}. Remove its TXT record from DNS too.", "success")
    return redirect(url_for("dkim_keys.index", domain_id=key.domain_id))


@bp.post("/keys/<int:key_id>/check")
@login_required
def check_dns(key_id: int):
    """Look the record up with the system's resolver (or DNS_RESOLVER) and remember the
    answer: the default selector signs only once its record was found."""
    key = scope.dkim_key_or_404(key_id)
    if not RowActionForm().validate_on_submit():
        abort(400)
    domain = scope.domain_or_404(key.domain_id)
    name, _value = record_of(key, domain.name)
    result = dkim.check_published(name, key.public_key_b64,
                                  nameservers=dns_resolvers(current_app.config), timeout=3.0)
    changed = key.dns_published != result.published
    key.dns_checked_at = utcnow()
    key.dns_published = result.published
    key.dns_problem = result.problem
    if changed:
        audit.record(db.session, actor=actor(), action="dns_check", target_type="dkim_key",
                     target_id=key.id, domain_id=key.domain_id, name=name,
                     published=result.published, problem=result.problem)
    db.session.commit()
    if changed:
        announce_change()
    if result.published:
        flash(f"{name} publishes this key.", "success")
    else:
        flash(result.problem or f"{name} does not publish this key yet.", "error")
    return redirect(url_for("dkim_keys.index", domain_id=key.domain_id) + f"#key-{key.id}")
