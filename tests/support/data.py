"""Creating domains, admins, outgoing users and identities the way the product does, for
test set-up."""

from __future__ import annotations

import os

from outgoing.db import make_sessionmaker, session_scope
from outgoing.models import Admin, Identity, OutgoingUser
from outgoing.passwords import hash_password
from outgoing.users import (
    Authority,
    apply_settings,
    create_outgoing_user,
    get_or_create_domain,
)

# Test set-up acts as a super admin who confirmed any overlap between domains' ranges; the
# tenancy rules themselves are tested in tests/security/.
SET_UP = Authority(confirm_overlap=True)


def _factory():
    return make_sessionmaker(os.environ["DATABASE_URL"])


def add_user(domain: str, kind: str, name: str, password: str | None = None, **settings) -> int:
    factory = _factory()
    with session_scope(factory) as session:
        dom = get_or_create_domain(session, domain)
        user = create_outgoing_user(session, domain=dom, kind=kind, name=name,
                                    password=password, authority=SET_UP, **settings)
        user_id = user.id
    factory.kw["bind"].dispose()
    return user_id


def add_admin(email: str, password: str, domain: str | None = None) -> int:
    factory = _factory()
    with session_scope(factory) as session:
        dom = get_or_create_domain(session, domain) if domain else None
        admin = Admin(email=email, password_hash=hash_password(password),
                      domain_id=dom.id if dom else None)
        session.add(admin)
        session.flush()
        admin_id = admin.id
    factory.kw["bind"].dispose()
    return admin_id


def add_identity(user_id: int, value: str) -> int:
    """An identity of ``user_id`` (its domain is filled in from the user, as on first sight)."""
    def add(session):
        identity = Identity(user_id=user_id, value=value)
        session.add(identity)
        session.flush()
        return identity.id
    return query(add)


def move_user(user_id: int, domain: str) -> None:
    """Move a user to another domain, as a super admin does on its settings page."""
    def move(session):
        apply_settings(session, session.get(OutgoingUser, user_id), {},
                       domain=get_or_create_domain(session, domain), authority=SET_UP)
    query(move)


def query(fn):
    """Run ``fn(session)`` against the test database and return its result."""
    factory = _factory()
    with session_scope(factory) as session:
        result = fn(session)
    factory.kw["bind"].dispose()
    return result
