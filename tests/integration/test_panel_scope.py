"""A domain admin never reaches another domain: every route of the panel, every id in a
form field or query string, every HTMX request answers 404, and nothing changes."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from outgoing.models import DkimKey, Domain, Identity, LockTemplate, OutgoingUser
from tests.integration.test_panel_users import Panel, text
from tests.support import data

OPS, OPS_PW = "ops@one.example", "Ops-pass-12345"
PANEL_BLUEPRINTS = {"users", "user_settings", "identities", "domains", "lock_templates",
                    "dkim_keys", "audit_log", "activity"}


def _other_domain(session) -> dict:
    """Everything a domain can own, in two.example."""
    two = session.scalar(select(Domain).where(Domain.name == "two.example"))
    user = session.scalar(select(OutgoingUser).where(OutgoingUser.name == "bob@two.example"))
    identity = Identity(user_id=user.id, value="bob-identity")
    template = LockTemplate(domain_id=two.id, name="Two's", subject="", body="")
    key = DkimKey(domain_id=two.id, selector="two1", private_key_pem="x", public_key_b64="y")
    session.add_all([identity, template, key])
    session.flush()
    return {"user_id": user.id, "identity_id": identity.id, "domain_id": two.id,
            "template_id": template.id, "key_id": key.id}


@pytest.fixture
def other(app):
    data.add_user("two.example", "user", "bob@two.example", "Bob-pass-12345")
    data.add_user("two.example", "ip", "10.2.0.0/16")
    return data.query(_other_domain)


@pytest.fixture
def ops(app, other):
    data.add_admin(OPS, OPS_PW, domain="one.example")
    data.add_user("one.example", "user", "alice@one.example", "Alice-pass-1234")
    return Panel(app.test_client()).login(OPS, OPS_PW)


def _snapshot():
    """What a stray request could have changed in two.example."""
    def read(session):
        rows = []
        for model in (OutgoingUser, Identity, LockTemplate, DkimKey, Domain):
            for row in session.scalars(select(model)):
                rows.append({c.name: getattr(row, c.name) for c in model.__table__.columns
                             if c.name not in ("updated_at",)})
        return rows
    return data.query(read)


def test_every_panel_route_answers_404_for_another_domains_ids(app, ops, other, redis_client):
    before = _snapshot()
    tried = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint.split(".")[0] not in PANEL_BLUEPRINTS or not rule.arguments:
            continue
        unknown = rule.arguments - other.keys()
        assert not unknown, f"{rule.rule}: teach this test about {unknown}"
        url = rule.rule
        for name in rule.arguments:
            url = url.replace(f"<int:{name}>", str(other[name]))
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            for htmx in (False, True):
                if method == "GET":
                    response = ops.get(url + "?index=1", htmx=htmx)
                else:
                    response = ops.post(url, {"name": "x", "selector": "s2",
                                              "lock_timeout_minutes": "5"}, htmx=htmx)
                assert response.status_code == 404, (method, url, htmx, response.status_code)
                tried.append((method, rule.endpoint))
    endpoints = {endpoint for _, endpoint in tried}
    assert {"users.lock", "users.unlock", "users.reset", "user_settings.edit",
            "user_settings.header_row", "identities.lock", "identities.unlock",
            "identities.reset", "domains.settings", "lock_templates.edit",
            "lock_templates.delete", "dkim_keys.index", "dkim_keys.delete",
            "activity.user_charts", "activity.user_why", "activity.identity",
            "activity.identity_charts", "activity.identity_why"} <= endpoints
    assert _snapshot() == before
    assert not redis_client.keys("og:{*}:*lock*")


def test_ids_and_domains_in_form_fields_and_query_strings_are_404(ops, other):
    before = _snapshot()
    alice = data.query(lambda s: s.scalar(select(OutgoingUser.id).where(
        OutgoingUser.name == "alice@one.example")))
    assert ops.get(f"/outgoing/identities?user={other['user_id']}").status_code == 404
    assert ops.add("user", "two.example", username="eve@two.example",
                   password="Eve-pass-12345", confirm_password="Eve-pass-12345",
                   htmx=True).status_code == 404
    assert ops.add("ip", "missing.example", ip_range="10.3.0.1").status_code == 404
    assert ops.post("/outgoing/users/check", {"kind": "ip", "domain": "two.example",
                                              "ip_range": "10.2.0.1"}, htmx=True,
                    **{"HX-Trigger-Name": "ip_range"}).status_code == 404
    settings = {"identification_method": "envelope_sender", "lock_timeout_minutes": "60",
                "maximum_unlocks_by_timeout": "3", "quarantine_response": "reject"}
    assert ops.post(f"/outgoing/users/{alice}", {
        **settings, "domain": "one.example",
        "lock_template_id": str(other["template_id"])}).status_code == 404
    assert ops.post(f"/outgoing/users/{alice}", {
        **settings, "domain": "two.example"}).status_code == 404
    assert ops.post("/outgoing/lock-templates/new", {
        "name": "Sneaky", "subject": "", "body": "", "domain": "two.example"}).status_code == 404
    assert _snapshot() == before


def test_another_domains_user_name_is_unknown_when_adding_an_identity(ops):
    response = ops.post("/outgoing/identities", {"user": "bob@two.example", "value": "x"})
    assert response.status_code == 400
    assert "No outgoing user is called bob@two.example." in text(response)


def test_lists_show_nothing_of_another_domain(ops, other):
    pages = {url: text(ops.get(url)) for url in (
        "/outgoing/users", "/outgoing/users?q=bob", "/outgoing/users?q=10.2.0.1",
        "/outgoing/users?q=two", "/outgoing/identities", "/outgoing/identities?q=bob",
        "/outgoing/lock-templates", "/audit")}
    for url, html in pages.items():
        assert "two.example" not in html and "bob-identity" not in html, url
        assert "Two&#39;s" not in html, url
    assert "alice@one.example" in pages["/outgoing/users"]


def test_a_domain_admin_reaches_only_their_own_domains_pages(ops, other):
    own = data.query(lambda s: s.scalar(select(Domain.id).where(Domain.name == "one.example")))
    assert ops.get("/outgoing/settings").headers["Location"] == f"/outgoing/settings/{own}"
    assert ops.get("/outgoing/dkim").headers["Location"] == f"/outgoing/dkim/{own}"
    assert ops.get(f"/outgoing/dkim/{own}").status_code == 200
    assert ops.get("/domains").status_code == 404
