"""Domain scoping: a domain admin sees and touches only their own domain, by any route.

Every query for domain-owned rows goes through these helpers; another domain's id is a 404,
exactly like an id that does not exist, so nothing leaks about other domains.
"""

from __future__ import annotations

from flask import abort, current_app
from flask_login import current_user
from sqlalchemy import Select, or_, select

from outgoing.models import DkimKey, Domain, Identity, LockTemplate, OutgoingUser
from outgoing.users import Authority, normalise_domain
from webapp.extensions import db


def domain_id() -> int | None:
    """The one domain this admin is limited to, or None for a super admin."""
    return None if current_user.is_super else current_user.domain_id


def authority(*, confirm_overlap: bool = False) -> Authority:
    """What the tenancy rules allow this admin: a customer's limits, or the provider's
    (with ``confirm_overlap`` only for a super admin who ticked the confirmation)."""
    if current_user.is_super:
        return Authority(confirm_overlap=confirm_overlap)
    return Authority.customer(current_user.domain_id, current_app.config)


def restrict(query: Select, model) -> Select:
    if current_user.is_super:
        return query
    return query.where(model.domain_id == current_user.domain_id)


def _one_or_404(query: Select):
    row = db.session.scalar(query)
    if row is None:
        abort(404)
    return row


def require_super() -> None:
    """Pages of the admin level only: to a domain admin they do not exist."""
    if not current_user.is_super:
        abort(404)


def outgoing_user_or_404(user_id: int) -> OutgoingUser:
    return _one_or_404(restrict(select(OutgoingUser), OutgoingUser)
                       .where(OutgoingUser.id == user_id))


def identity_or_404(identity_id: int) -> Identity:
    query = select(Identity).where(Identity.id == identity_id)
    if not current_user.is_super:
        query = query.join(OutgoingUser, OutgoingUser.id == Identity.user_id).where(
            OutgoingUser.domain_id == current_user.domain_id)
    return _one_or_404(query)


def domain_or_404(domain_id_: int) -> Domain:
    query = select(Domain).where(Domain.id == domain_id_)
    if not current_user.is_super:
        query = query.where(Domain.id == current_user.domain_id)
    return _one_or_404(query)


def dkim_key_or_404(key_id: int) -> DkimKey:
    return _one_or_404(restrict(select(DkimKey), DkimKey).where(DkimKey.id == key_id))


def lock_templates_query(for_domain_id: int | None = None) -> Select:
    """Templates this admin may use: shared ones (no domain) and their domain's.

    ``for_domain_id`` narrows a super admin's choice to what fits one domain's users."""
    scope_id = domain_id() if for_domain_id is None else for_domain_id
    query = select(LockTemplate)
    if scope_id is not None:
        query = query.where(or_(LockTemplate.domain_id.is_(None),
                                LockTemplate.domain_id == scope_id))
    return query.order_by(LockTemplate.name, LockTemplate.id)


def lock_template_or_404(template_id: int, *, editable: bool = False) -> LockTemplate:
    """A template this admin may see; with ``editable``, one they may change (a domain admin
    reads the shared templates but changes only their domain's)."""
    query = select(LockTemplate).where(LockTemplate.id == template_id)
    if not current_user.is_super:
        if editable:
            query = query.where(LockTemplate.domain_id == current_user.domain_id)
        else:
            query = query.where(or_(LockTemplate.domain_id.is_(None),
                                    LockTemplate.domain_id == current_user.domain_id))
    return _one_or_404(query)


def visible_domains(limit: int = 1000) -> list[Domain]:
    query = select(Domain).order_by(Domain.name)
    if not current_user.is_super:
        query = query.where(Domain.id == current_user.domain_id)
    return list(db.session.scalars(query.limit(limit)))


def visible_domain(name: str | None) -> Domain | None:
    """The domain called ``name`` if this admin may act on it."""
    try:
        name = normalise_domain(name or "")
    except ValueError:
        return None
    query = select(Domain).where(Domain.name == name)
    if not current_user.is_super:
        query = query.where(Domain.id == current_user.domain_id)
    return db.session.scalar(query)


def domain_named(text: str | None) -> Domain:
    """The domain a form names, for a field that must name an existing domain.

    Raises ValueError (a message for the form) when the name is not a valid domain name or
    no such domain exists. A domain admin naming any other domain gets a 404, whether it
    exists or not, so the form cannot be used to find out which domains exist."""
    name = normalise_domain(text or "")
    if not current_user.is_super:
        own = db.session.get(Domain, current_user.domain_id)
        if own is None or own.name != name:
            abort(404)
        return own
    domain = db.session.scalar(select(Domain).where(Domain.name == name))
    if domain is None:
        raise ValueError(f"There is no domain {name}. Add it on the Domains page first.")
    return domain
