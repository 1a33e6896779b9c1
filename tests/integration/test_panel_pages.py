"""Outgoing > Settings, Lock Templates, DKIM, the Audit log and the Domains page."""

from __future__ import annotations

import html as html_lib
import json
import re

import pytest
from sqlalchemy import select

from outgoing import dkim
from outgoing.models import AuditEvent, DkimKey, Domain, LockTemplate, OutgoingUser
from tests.integration.test_panel_users import ROOT, ROOT_PW, Panel, text
from tests.support import data

OPS, OPS_PW = "ops@example.com", "Ops-pass-12345"


@pytest.fixture
def root(app):
    data.add_admin(ROOT, ROOT_PW)
    data.add_user("example.com", "domain", "example.com", "Domain-pass-123")
    return Panel(app.test_client()).login(ROOT, ROOT_PW)


@pytest.fixture
def ops(app, root):
    data.add_admin(OPS, OPS_PW, domain="example.com")
    return Panel(app.test_client()).login(OPS, OPS_PW)


def domain_id(name: str = "example.com") -> int:
    return data.query(lambda s: s.scalar(select(Domain.id).where(Domain.name == name)))


def audit_actions() -> list[tuple[str, str]]:
    return data.query(lambda s: [(e.action, e.target_type) for e in s.scalars(
        select(AuditEvent).order_by(AuditEvent.id))])


# --- Outgoing > Settings -----------------------------------------------------------------

def test_a_domain_admin_sets_the_abuse_report_address_of_their_domain(ops, redis_client):
    response = ops.get("/outgoing/settings")
    assert response.headers["Location"] == f"/outgoing/settings/{domain_id()}"
    html = text(ops.get(response.headers["Location"]))
    assert '<label for="abuse_report_address">Abuse report address</label>' in html
    assert '<label for="quarantine_report_enabled">Daily quarantine report</label>' in html
    response = ops.post(f"/outgoing/settings/{domain_id()}", {
        "abuse_report_address": " Abuse@Example.com ", "quarantine_report_enabled": "y"})
    assert response.status_code == 302
    domain = data.query(lambda s: s.get(Domain, domain_id()))
    assert domain.abuse_report_address == "abuse@example.com"
    assert domain.quarantine_report_enabled is True
    assert audit_actions()[-1] == ("update", "domain")
    assert redis_client.get("og:config-version") is not None


@pytest.mark.parametrize("menu, page", [("/outgoing/settings", "/outgoing/settings/{}"),
                                        ("/outgoing/dkim", "/outgoing/dkim/{}")])
def test_a_super_admin_with_one_domain_goes_straight_to_it(root, menu, page):
    response = root.get(menu)
    assert response.status_code == 302
    assert response.headers["Location"] == page.format(domain_id())


@pytest.mark.parametrize("menu, page", [("/outgoing/settings", "/outgoing/settings/{}"),
                                        ("/outgoing/dkim", "/outgoing/dkim/{}")])
def test_a_super_admin_with_several_domains_picks_one_on_the_page(root, menu, page):
    data.add_user("shop.example.net", "domain", "shop.example.net", "Domain-pass-123")
    response = root.get(menu)
    assert response.status_code == 200  # not sent off to the Domains list
    html = text(response)
    assert '<label for="pick-domain">Domain</label>' in html
    assert f'<form method="get" action="{menu}"' in html
    for name in ("example.com", "shop.example.net"):
        assert f'<option value="{domain_id(name)}"' in html and f">{name}</option>" in html
    picked = root.get(f"{menu}?domain={domain_id('shop.example.net')}")
    assert picked.headers["Location"] == page.format(domain_id("shop.example.net"))
    there = text(root.get(picked.headers["Location"]))
    assert "shop.example.net" in there and 'id="pick-domain"' in there  # switch from there
    assert root.get(f"{menu}?domain=99999").status_code == 404


@pytest.mark.parametrize("menu", ["/outgoing/settings", "/outgoing/dkim"])
def test_a_domain_admin_never_picks_another_domain(ops, menu):
    data.add_user("shop.example.net", "domain", "shop.example.net", "Domain-pass-123")
    assert ops.get(menu).headers["Location"].endswith(f"/{domain_id()}")
    assert ops.get(f"{menu}?domain={domain_id('shop.example.net')}").status_code == 404
    html = text(ops.get(ops.get(menu).headers["Location"]))
    assert "pick-domain" not in html and "shop.example.net" not in html


@pytest.mark.parametrize("address, message", [
    ("not-an-address", "Enter an email address such as abuse@example.com"),
    ("two@@example.com", "Enter an email address such as abuse@example.com"),
])
def test_the_abuse_report_address_must_be_an_email_address(ops, address, message):
    response = ops.post(f"/outgoing/settings/{domain_id()}", {"abuse_report_address": address})
    assert response.status_code == 400 and message in text(response)


def test_the_daily_quarantine_report_needs_an_address(ops):
    response = ops.post(f"/outgoing/settings/{domain_id()}", {
        "abuse_report_address": "", "quarantine_report_enabled": "y"})
    assert response.status_code == 400
    assert "needs an Abuse report address" in text(response)


# --- Lock Templates ----------------------------------------------------------------------

def test_a_lock_template_is_created_previewed_and_chosen_for_a_user(ops):
    form = ops.get("/outgoing/lock-templates/new")
    assert "{{ unlock_time }}" in html_lib.unescape(text(form))  # placeholders documented
    preview = ops.post("/outgoing/lock-templates/preview", {
        "name": "x", "subject": "Paused: {{ user|upper }}", "body": "Since {{ lock_time }}"},
        htmx=True)
    assert "Paused: SHOP.EXAMPLE.COM" in text(preview)
    assert "Since 2025-03-04 09:15 UTC" in text(preview)
    response = ops.post("/outgoing/lock-templates/new", {
        "name": "Friendly", "subject": "Paused: {{ user }}",
        "body": "Hello {{ identity }}, see {{ reason }}."})
    assert response.status_code == 302
    template = data.query(lambda s: s.scalar(select(LockTemplate)))
    assert template.domain_id == domain_id()  # a domain admin writes for their domain
    user = data.query(lambda s: s.scalar(select(OutgoingUser.id)))
    assert f'<option value="{template.id}">Friendly</option>' in text(
        ops.get(f"/outgoing/users/{user}"))
    assert audit_actions()[-1] == ("create", "lock_template")


NESTED = "brackets, {% if %} blocks or operators are nested too deeply"
DEEP_LOCK_TEMPLATES = [
    ("{{ " + "(" * 400 + "user" + ")" * 400 + " }}", NESTED),
    ("{% if user %}" * 300 + "x" + "{% endif %}" * 300, NESTED),
    ("{{ " + "9" * 5000 + " }}", "a number has too many digits"),
]


@pytest.mark.parametrize("body, message", [
    ("{{ user.__class__ }}", "attribute access (a.b) cannot be used"),
    ("{% for x in user %}{% endfor %}", "loops ({% for %}) cannot be used"),
    ("{{ password }}", "unknown placeholder"),
    ("{% if %}", "syntax error on line 1"),
    *DEEP_LOCK_TEMPLATES,
])
def test_a_broken_lock_template_is_a_form_error(ops, body, message):
    response = ops.post("/outgoing/lock-templates/new", {"name": "Bad", "subject": "",
                                                         "body": body})
    assert response.status_code == 400
    assert message in html_lib.unescape(text(response))
    assert data.query(lambda s: s.scalar(select(LockTemplate))) is None


@pytest.mark.parametrize("body, message", DEEP_LOCK_TEMPLATES)
def test_the_preview_shows_why_a_deep_lock_template_cannot_be_used(ops, body, message):
    """Jinja raised RecursionError or ValueError here, not TemplateSyntaxError: a 500."""
    preview = ops.post("/outgoing/lock-templates/preview", {"name": "x", "subject": "",
                                                            "body": body}, htmx=True)
    assert preview.status_code == 200
    assert f"Body: {message}" in html_lib.unescape(text(preview))
    assert "Why: 5 messages classified as spam" in text(preview)  # the built-in text


def test_shared_templates_are_readable_but_not_editable_by_a_domain_admin(ops, root):
    root.post("/outgoing/lock-templates/new", {"name": "Shared", "subject": "", "body": "",
                                               "domain": ""})
    shared = data.query(lambda s: s.scalar(select(LockTemplate)))
    assert shared.domain_id is None
    page = text(ops.get(f"/outgoing/lock-templates/{shared.id}"))
    assert "shared by the super admin" in page
    response = ops.post(f"/outgoing/lock-templates/{shared.id}",
                        {"name": "Mine now", "subject": "", "body": ""})
    assert response.status_code == 404
    assert ops.post(f"/outgoing/lock-templates/{shared.id}/delete").status_code == 404


def test_editing_and_deleting_a_template_is_audited(ops):
    ops.post("/outgoing/lock-templates/new", {"name": "One", "subject": "A", "body": "B"})
    template = data.query(lambda s: s.scalar(select(LockTemplate.id)))
    response = ops.post(f"/outgoing/lock-templates/{template}",
                        {"name": "One", "subject": "A2", "body": "B"})
    assert response.status_code == 302
    ops.post(f"/outgoing/lock-templates/{template}/delete")
    assert data.query(lambda s: s.get(LockTemplate, template)) is None
    changes = data.query(lambda s: [json.loads(e.detail) for e in s.scalars(
        select(AuditEvent).where(AuditEvent.target_type == "lock_template")
        .order_by(AuditEvent.id))])
    assert changes[1]["changes"] == {"subject": ["A", "A2"]}
    assert [a for a, t in audit_actions() if t == "lock_template"] == [
        "create", "update", "delete"]


# --- DKIM --------------------------------------------------------------------------------

def test_an_rsa_key_is_generated_and_its_exact_txt_record_shown(ops):
    response = ops.post(f"/outgoing/dkim/{domain_id()}", {"selector": "Mail2025",
                                                         "algorithm": "rsa"})
    assert response.status_code == 302
    key = data.query(lambda s: s.scalar(select(DkimKey)))
    assert key.selector == "mail2025" and key.algorithm == "rsa"
    page = text(ops.get(response.headers["Location"]))
    pair = dkim.DkimKeyPair("", key.public_key_b64, "rsa")
    name, value = dkim.txt_record("mail2025", "example.com", pair)
    assert name == "mail2025._domainkey.example.com"
    assert f"<code class=\"copy\" data-record-name>{name}</code>" in page
    assert value in page and value.startswith("v=DKIM1; k=rsa; p=MIIBIjAN")
    assert "PRIVATE KEY" not in page and key.private_key_pem.splitlines()[1] not in page
    user = data.query(lambda s: s.scalar(select(OutgoingUser.id)))
    assert '<option value="mail2025">mail2025</option>' in text(
        ops.get(f"/outgoing/users/{user}"))


def test_an_ed25519_key_can_be_chosen_and_selectors_are_unique(ops):
    ops.post(f"/outgoing/dkim/{domain_id()}", {"selector": "ed1", "algorithm": "ed25519"})
    key = data.query(lambda s: s.scalar(select(DkimKey)))
    assert key.algorithm == "ed25519"
    assert "v=DKIM1; k=ed25519; p=" in text(ops.get(f"/outgoing/dkim/{domain_id()}"))
    response = ops.post(f"/outgoing/dkim/{domain_id()}", {"selector": "ed1",
                                                         "algorithm": "rsa"})
    assert response.status_code == 400 and "already has a key for the selector ed1" in text(
        response)
    response = ops.post(f"/outgoing/dkim/{domain_id()}", {"selector": "-bad_selector",
                                                         "algorithm": "rsa"})
    assert response.status_code == 400 and "inner hyphens" in text(response)


def test_a_key_in_use_is_not_deleted(ops):
    ops.post(f"/outgoing/dkim/{domain_id()}", {"selector": "s1", "algorithm": "ed25519"})
    key = data.query(lambda s: s.scalar(select(DkimKey.id)))
    data.query(lambda s: [setattr(u, "dkim_selector", "s1")
                          for u in s.scalars(select(OutgoingUser))])
    ops.post(f"/outgoing/dkim/keys/{key}/delete")
    assert data.query(lambda s: s.get(DkimKey, key)) is not None
    data.query(lambda s: [setattr(u, "dkim_selector", None)
                          for u in s.scalars(select(OutgoingUser))])
    ops.post(f"/outgoing/dkim/keys/{key}/delete")
    assert data.query(lambda s: s.get(DkimKey, key)) is None


# --- Audit log ---------------------------------------------------------------------------

def test_the_audit_log_shows_who_changed_what_with_before_and_after(ops, root):
    user = data.query(lambda s: s.scalar(select(OutgoingUser.id)))
    ops.post(f"/outgoing/users/{user}/lock", {"reason": "too much spam"}, htmx=True)
    root.post(f"/outgoing/users/{user}/unlock")
    data.add_user("other.example", "domain", "other.example", "Other-pass-123")
    root.post("/domains", {"name": "hidden.example"})
    page = text(ops.get("/audit"))
    assert "too much spam" in page and OPS in page and ROOT in page
    assert "hidden.example" not in page  # another domain's events stay hidden
    assert "hidden.example" in text(root.get("/audit"))
    form = {"domain": "example.com", "identification_method": "envelope_sender",
            "lock_timeout_minutes": "90", "maximum_unlocks_by_timeout": "3",
            "quarantine_response": "reject"}
    ops.post(f"/outgoing/users/{user}", form)
    page = text(ops.get("/audit"))
    assert re.search(r'<td>lock_timeout_minutes</td><td class="before">60</td>'
                     r'<td class="after">90</td>', page)


# --- Domains -----------------------------------------------------------------------------

def test_a_super_admin_adds_a_domain_and_then_sets_it_up(root, redis_client):
    response = root.post("/domains", {"name": "Bücher.Example"})
    assert response.status_code == 302
    added = domain_id("xn--bcher-kva.example")
    assert response.headers["Location"] == f"/outgoing/settings/{added}"
    assert "xn--bcher-kva.example" in text(root.get("/domains"))
    assert root.post("/domains", {"name": "bücher.example"}).status_code == 400
    response = root.post("/domains", {"name": "no_such domain"})
    assert response.status_code == 400 and "is not a valid domain name" in text(response)
    assert ("create", "domain") in audit_actions()


def test_domain_admins_have_no_domains_page(ops):
    assert ops.get("/domains").status_code == 404
    assert ops.post("/domains", {"name": "mine.example"}).status_code == 404
