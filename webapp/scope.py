"""Domain scoping: a domain admin sees and touches only their own domain, by any route.

Every query for domain-owned rows goes through these helpers; another domain's id is a 404,
exactly like an id that does not exist, so nothing leaks about other domains.
"""

from __future__ import annotations

from flask import abort
from flask_login import current_user
from sqlalchemy import Select, select

from outgoing.models import Domain, OutgoingUser
from webapp.extensions import db


def restrict(query: Select, model) -> Select:
    if current_user.is_super:
        return query
    return query.where(model.domain_id == current_user.domain_id)


def outgoing_user_or_404(user_id: int) -> OutgoingUser:
    user = db.session.scalar(restrict(select(OutgoingUser), OutgoingUser)
                             .where(OutgoingUser.id == user_id))
    if user is None:
        abort(404)
    return user


def visible_domains() -> list[Domain]:
    query = select(Domain).order_by(Domain.name)
    if not current_user.is_super:
        query = query.where(Domain.id == current_user.domain_id)
    return list(db.session.scalars(query))


def visible_domain(name: str | None) -> Domain | None:
    """The domain called ``name`` if this admin may act on it."""
    query = select(Domain).where(Domain.name == (name or "").strip().lower())
    if not current_user.is_super:
        query = query.where(Domain.id == current_user.domain_id)
    return db.session.scalar(query)
