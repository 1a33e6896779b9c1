"""A NUL character anywhere in a request (its address, a query argument, a form field) is
refused with a clear 400 before any page runs, logged in or not, and nothing is written.
PostgreSQL cannot hold NUL in text, so each of these was a 500 there; run this file with
DATABASE_URL pointing at PostgreSQL too."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from outgoing.models import AuditEvent, Identity, LockTemplate, OutgoingUser
from tests.security.conftest import ROOT, ROOT_PW
from tests.support import data
from tests.support.web import csrf_token

REFUSAL = "holds a NUL character"


def written() -> tuple:
    """What a refused request must not have changed."""
    def count(model):
        return lambda s: s.scalar(select(func.count()).select_from(model))
    return (tuple(data.query(count(m)) for m in (AuditEvent, Identity, LockTemplate)),
            data.query(lambda s: s.scalar(select(OutgoingUser.locked))))


def refused(response) -> bool:
    return response.status_code == 400 and REFUSAL in response.get_data(as_text=True)


def test_the_login_form_refuses_a_nul_before_anyone_logged_in(app):
    data.add_admin(ROOT, ROOT_PW)
    web = app.test_client()
    response = web.post("/login", data={"email": "a\x00@b", "password": "x",
                                        "csrf_token": csrf_token(web)})
    assert refused(response)
    assert refused(web.get("/login?next=/outgoing/users%00"))
    assert refused(web.get("/unlock/a%00b"))


@pytest.mark.parametrize("url", [
    "/outgoing/users?q=%00", "/outgoing/identities?q=a%00", "/outgoing/quarantine?q=%00",
    "/outgoing/archive?sender=%00", "/outgoing/log?subject=%00", "/outgoing/log?user=%00",
    "/domains?q=%00", "/outgoing/users?%00=1",
])
def test_a_search_holding_a_nul_is_refused(root, url):
    assert refused(root.get(url))
    assert refused(root.get(url, htmx=True))


@pytest.mark.parametrize("url, form", [
    ("/outgoing/users/{bob}/lock", {"reason": "spam\x00run"}),
    ("/outgoing/lock-templates/new", {"name": "Ni\x00ce", "subject": "s", "body": "b",
                                      "domain": ""}),
    ("/outgoing/identities", {"user": "bob@example.com\x00", "value": "shop-42"}),
    ("/outgoing/identities", {"user": "bob@example.com", "value": "shop\x00"}),
])
def test_a_form_holding_a_nul_is_refused_and_changes_nothing(root, bob, url, form):
    before = written()
    assert refused(root.post(url.format(bob=bob), form))
    assert written() == before


def test_tab_and_line_breaks_are_still_ordinary_text(root, bob):
    response = root.post(f"/outgoing/users/{bob}/lock", {"reason": "spam\r\n\trun"})
    assert response.status_code == 302
    assert data.query(lambda s: s.get(OutgoingUser, bob).locked)
