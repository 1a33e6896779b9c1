"""Attacks by a customer (a domain admin of one.example) through the control panel, and the
provider's (super admin's) confirmed exceptions: DESIGN.md "Tenancy".

Each attack is refused with a message under the field and changes nothing; the legitimate
same-domain case still works.
"""

from __future__ import annotations

import json
import re

import pytest
from sqlalchemy import select

from outgoing import redis_keys
from outgoing.models import AuditEvent, LockTemplate, OutgoingUser
from outgoing.users import get_or_create_domain
from tests.integration.test_panel_settings import settings
from tests.integration.test_panel_users import Panel, user_named
from tests.support import data

OPS, OPS_PW = "ops@one.example", "Ops-pass-12345"
ROOT, ROOT_PW = "root@example.net", "Root-pass-12345"
GOOD_PW = "Alice-pass-123"


@pytest.fixture
def other(app):
    """Another customer, two.example, with a range and a login of its own."""
    data.add_user("two.example", "ip", "10.2.0.0/28")
    data.add_user("two.example", "user", "carol@two.example", GOOD_PW)


@pytest.fixture
def ops(app, other) -> Panel:
    data.add_admin(OPS, OPS_PW, domain="one.example")
    return Panel(app.test_client()).login(OPS, OPS_PW)


@pytest.fixture
def root(app, other) -> Panel:
    data.add_admin(ROOT, ROOT_PW)
    data.add_user("one.example", "user", "seed@one.example", GOOD_PW)  # one.example exists
    return Panel(app.test_client()).login(ROOT, ROOT_PW)


def users() -> list[tuple[str, str]]:
    return data.query(lambda s: sorted(
        (u.name, u.domain.name) for u in s.scalars(select(OutgoingUser))))


def error_under(html: str, field: str) -> str:
    """The refusal shown in place, under the field ``field``."""
    match = re.search(rf'id="{field}-msg"[^>]*>\s*<p class="error"[^>]*>([^<]*)</p>', html)
    assert match, f"no error under {field}"
    return " ".join(match.group(1).split())


def audit_events(action: str) -> list[dict]:
    return data.query(lambda s: [
        dict(json.loads(e.detail), actor=e.actor, target_id=e.target_id)
        for e in s.scalars(select(AuditEvent).where(AuditEvent.action == action))])


# -- open relay ------------------------------------------------------------------------------

@pytest.mark.parametrize("whole", ["0.0.0.0/0", "::/0", "0.0.0.0-255.255.255.255",
                                   "::ffff:0.0.0.0/96"])
def test_a_customer_cannot_make_the_proxy_an_open_relay(ops, whole):
    before = users()
    response = ops.add("ip", "one.example", ip_range=whole, htmx=True)
    assert response.status_code == 400
    assert "open relay" in error_under(response.get_data(as_text=True), "ip_range")
    assert users() == before


@pytest.mark.parametrize("whole", ["0.0.0.0/0", "::/0"])
def test_nor_can_a_super_admin_even_after_confirming(root, whole):
    before = users()
    response = root.add("ip", "one.example", ip_range=whole, confirm_overlap="y", htmx=True)
    assert response.status_code == 400
    assert "open relay" in error_under(response.get_data(as_text=True), "ip_range")
    assert users() == before


def test_the_check_as_you_type_says_so_before_submitting(ops):
    response = ops.post("/outgoing/users/check?field=ip_range",
                        {"kind": "ip", "ip_range": "0.0.0.0/0"}, htmx=True)
    assert "open relay" in response.get_data(as_text=True)


# -- width ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("too_wide", "widest"), [("192.0.2.0/23", "192.0.2.0/24"),
                                                  ("2001:db8::/47", "2001:db8::/48"),
                                                  ("192.0.2.0-192.0.3.0", "192.0.3.0/24")])
def test_a_customer_range_is_at_most_a_slash_24_or_48(ops, too_wide, widest):
    response = ops.add("ip", "one.example", ip_range=too_wide, htmx=True)
    assert response.status_code == 400
    assert "the most a customer may add" in error_under(response.get_data(as_text=True),
                                                        "ip_range")
    assert ops.add("ip", "one.example", ip_range=widest, action="add").status_code == 302
    assert (widest, "one.example") in users()
    assert not any(name == too_wide for name, _ in users())


def test_the_width_cap_is_a_setting(app, other):
    from webapp import create_app

    data.add_admin(OPS, OPS_PW, domain="one.example")
    narrow = Panel(create_app({"TESTING": True, "MAX_CUSTOMER_RANGE_V4": 28})
                   .test_client()).login(OPS, OPS_PW)
    assert narrow.add("ip", "one.example", ip_range="192.0.2.0/27").status_code == 400
    assert narrow.add("ip", "one.example", ip_range="192.0.2.0/28",
                      action="add").status_code == 302


def test_a_super_admin_may_add_a_wider_range(root):
    assert root.add("ip", "one.example", ip_range="198.51.0.0/16",
                    action="add").status_code == 302
    assert ("198.51.0.0/16", "one.example") in users()


# -- other customers' addresses ------------------------------------------------------------

@pytest.mark.parametrize("inside", ["10.2.0.4", "10.2.0.0/24", "10.2.0.0/28",
                                    "10.1.255.255-10.2.0.0"])
def test_a_customer_cannot_take_over_another_customers_addresses(ops, inside):
    before = users()
    response = ops.add("ip", "one.example", ip_range=inside, htmx=True)
    assert response.status_code == 400
    message = error_under(response.get_data(as_text=True), "ip_range")
    assert "another customer" in message
    # Nothing leaks: neither the other customer nor their range (unless typed in full).
    assert "two.example" not in message
    assert message.count("10.2.0.0/28") == (inside == "10.2.0.0/28")
    assert users() == before


def test_nested_ranges_of_ones_own_domain_are_allowed(ops):
    assert ops.add("ip", "one.example", ip_range="192.0.2.10-192.0.2.20",
                   action="add").status_code == 302
    assert ops.add("ip", "one.example", ip_range="192.0.2.15", action="add").status_code == 302
    assert ops.add("ip", "one.example", ip_range="192.0.2.0/24",
                   action="add").status_code == 302  # around both
    assert {("192.0.2.10-192.0.2.20", "one.example"), ("192.0.2.15", "one.example"),
            ("192.0.2.0/24", "one.example")} <= set(users())


def test_crossing_ranges_of_ones_own_domain_are_refused(ops):
    assert ops.add("ip", "one.example", ip_range="192.0.2.10-192.0.2.20",
                   action="add").status_code == 302
    response = ops.add("ip", "one.example", ip_range="192.0.2.18-192.0.2.30", htmx=True)
    assert response.status_code == 400
    assert "may nest" in error_under(response.get_data(as_text=True), "ip_range")


def test_a_super_admin_overlaps_another_domain_only_after_confirming_and_it_is_audited(root):
    response = root.add("ip", "one.example", ip_range="10.2.0.4", htmx=True)
    html = response.get_data(as_text=True)
    assert response.status_code == 400
    assert "10.2.0.0/28 (two.example)" in error_under(html, "ip_range")
    assert 'name="confirm_overlap"' in html  # the confirmation step appears
    assert user_named("10.2.0.4") is None

    response = root.add("ip", "one.example", ip_range="10.2.0.4", confirm_overlap="y",
                        action="add")
    assert response.status_code == 302
    assert ("10.2.0.4", "one.example") in users()
    created = [e for e in audit_events("create") if e["name"] == "10.2.0.4"]
    assert created and created[0]["overlap_confirmed"] == ["10.2.0.0/28 (two.example)"]
    assert created[0]["actor"] == ROOT


def audit_pages(panel: Panel) -> list[str]:
    """The Audit log as the full page and as the HTMX swap of its list."""
    page = panel.get("/audit")
    swap = panel.get("/audit", htmx=True, **{"HX-Target": "audit-list"})
    assert page.status_code == swap.status_code == 200
    assert '<div id="audit-list">' in swap.get_data(as_text=True)
    return [page.get_data(as_text=True), swap.get_data(as_text=True)]


def test_a_confirmed_overlap_names_the_other_customer_to_the_provider_only(root, ops):
    response = root.add("ip", "one.example", ip_range="10.2.0.4", confirm_overlap="y",
                        action="add")
    assert response.status_code == 302
    for html in audit_pages(ops):  # one.example's own event, shown to one.example
        assert "10.2.0.4" in html
        assert "two.example" not in html and "10.2.0.0/28" not in html
    for html in audit_pages(root):
        assert "10.2.0.0/28 (two.example)" in html


def test_a_user_moved_in_by_the_provider_does_not_name_the_domain_it_left(root, app):
    moved = data.add_user("one.example", "ip", "192.0.2.0/24")
    data.add_admin("ops@four.example", OPS_PW, domain="four.example")
    response = root.post(f"/outgoing/users/{moved}", settings(domain="four.example"))
    assert response.status_code == 302
    four = Panel(app.test_client()).login("ops@four.example", OPS_PW)
    for html in audit_pages(four):
        assert "192.0.2.0/24" in html and "another domain" in html
        assert "one.example" not in html
    assert all("one.example" in html for html in audit_pages(root))


def test_a_domain_admin_cannot_confirm_an_overlap(ops):
    response = ops.add("ip", "one.example", ip_range="10.2.0.4", confirm_overlap="y")
    assert response.status_code == 400
    assert user_named("10.2.0.4") is None


def test_a_super_admin_moving_a_range_to_another_domain_meets_the_same_rules(root):
    one_ip = data.add_user("one.example", "ip", "192.0.2.0/24")
    data.add_user("three.example", "ip", "192.0.2.200-192.0.3.10")
    assert "Shared smarthost" in root.get(f"/outgoing/users/{one_ip}").get_data(as_text=True)
    response = root.post(f"/outgoing/users/{one_ip}", settings(domain="three.example"))
    assert response.status_code == 400
    assert "without lying inside it or around it" in response.get_data(as_text=True)
    assert ("192.0.2.0/24", "one.example") in users()
    # Onto another domain's addresses: only confirmed, and the audit log says so.
    data.add_user("five.example", "ip", "192.0.2.77")
    data.query(lambda s: get_or_create_domain(s, "four.example"))
    response = root.post(f"/outgoing/users/{one_ip}", settings(domain="four.example"))
    assert response.status_code == 400
    assert "Confirm the overlap" in response.get_data(as_text=True)
    response = root.post(f"/outgoing/users/{one_ip}", settings(domain="four.example",
                                                               confirm_overlap="y"))
    assert response.status_code == 302
    assert ("192.0.2.0/24", "four.example") in users()
    moved = [e for e in audit_events("update") if e["target_id"] == one_ip]
    assert moved[-1]["overlap_confirmed"] == ["192.0.2.77 (five.example)",
                                              "192.0.2.200-192.0.3.10 (three.example)"]


# -- logins --------------------------------------------------------------------------------

def test_a_customer_cannot_add_a_login_in_another_domain(ops):
    before = users()
    response = ops.add("user", "one.example", username="eve@other.test", password=GOOD_PW,
                       confirm_password=GOOD_PW, htmx=True)
    assert response.status_code == 400
    refusal = error_under(response.get_data(as_text=True), "username")
    assert "must be an address in one.example" in refusal
    assert users() == before


@pytest.mark.parametrize("username", ["eve@other.test@one.example", "<b>eve</b>@one.example",
                                      "eve@other.test@", "a..b", ".eve", "x" * 65])
def test_a_customer_login_must_be_an_address_of_their_domain(ops, username):
    before = users()
    response = ops.add("user", "one.example", username=username, password=GOOD_PW,
                       confirm_password=GOOD_PW, htmx=True)
    assert response.status_code == 400
    refusal = error_under(response.get_data(as_text=True), "username")
    assert "must be an address in one.example" in refusal
    assert users() == before


def test_a_customer_login_may_be_any_address_of_their_domain(ops):
    response = ops.add("user", "one.example", username="o'brien+shop.2@one.example",
                       password=GOOD_PW, confirm_password=GOOD_PW, htmx=True)
    assert response.status_code == 204


def test_refusals_do_not_tell_whether_another_customer_has_the_login(ops):
    def refusal(name: str) -> str:
        response = ops.add("user", "one.example", username=name, password=GOOD_PW,
                           confirm_password=GOOD_PW, htmx=True)
        assert response.status_code == 400
        return error_under(response.get_data(as_text=True), "username")

    assert refusal("carol@two.example") == refusal("nobody@two.example")
    check = [ops.post("/outgoing/users/check?field=username",
                      {"kind": "user", "username": name}, htmx=True).get_data(as_text=True)
             for name in ("carol@two.example", "nobody@two.example")]
    assert check[0] == check[1]
    assert "exists" not in check[0]


def test_a_bare_local_part_becomes_an_address_in_the_admins_domain(ops):
    response = ops.add("user", "one.example", username="Dave", password=GOOD_PW,
                       confirm_password=GOOD_PW, action="add")
    assert response.status_code == 302
    assert ("dave@one.example", "one.example") in users()
    assert ops.add("user", "one.example", username="erin@ONE.example", password=GOOD_PW,
                   confirm_password=GOOD_PW, action="add").status_code == 302
    assert ("erin@one.example", "one.example") in users()


def test_a_super_admin_may_add_any_login(root):
    assert root.add("user", "one.example", username="relay-login", password=GOOD_PW,
                    confirm_password=GOOD_PW, action="add").status_code == 302
    assert ("relay-login", "one.example") in users()


def test_the_domain_field_is_fixed_for_a_domain_admin(ops):
    page = ops.get("/outgoing/users").get_data(as_text=True)
    assert not re.search(r'<input[^>]*name="domain"', page)
    assert "one.example" in page
    # A forged Domain field is another domain: 404, and nothing is added anywhere.
    before = users()
    assert ops.add("domain", "two.example", password=GOOD_PW, confirm_password=GOOD_PW,
                   action="add").status_code == 404
    assert ops.add("ip", "two.example", ip_range="198.51.100.7").status_code == 404
    assert users() == before
    # Their own Authenticating Domain is theirs to add.
    assert ops.add("domain", "one.example", password=GOOD_PW, confirm_password=GOOD_PW,
                   action="add").status_code == 302
    assert ("one.example", "one.example") in users()


# -- shared smarthost ----------------------------------------------------------------------

def _settings_form(**fields) -> dict:
    return settings(domain="one.example", reauthenticate_as="domain", **fields)


def test_a_domain_admin_neither_sees_nor_sets_shared_smarthost(ops):
    ip_user = data.add_user("one.example", "ip", "192.0.2.7")
    page = ops.get(f"/outgoing/users/{ip_user}").get_data(as_text=True)
    assert "Shared smarthost" not in page and "shared_smarthost" not in page
    response = ops.post(f"/outgoing/users/{ip_user}",
                        _settings_form(shared_smarthost="y"))
    assert response.status_code == 302
    user = data.query(lambda s: s.get(OutgoingUser, ip_user))
    assert user.shared_smarthost is False
    assert user.reauthenticate_as == "domain"  # the rest of the form was saved
    forged = audit_events("forged_field")
    assert forged and forged[0]["fields"] == ["shared_smarthost"]
    assert forged[0]["actor"] == OPS and forged[0]["target_id"] == ip_user


def test_a_super_admin_sets_shared_smarthost_and_it_is_audited(root):
    ip_user = data.add_user("one.example", "ip", "192.0.2.7")
    response = root.post(f"/outgoing/users/{ip_user}",
                         _settings_form(shared_smarthost="y"))
    assert response.status_code == 302
    assert data.query(lambda s: s.get(OutgoingUser, ip_user)).shared_smarthost is True
    updates = [e for e in audit_events("update") if e["target_id"] == ip_user]
    assert updates and updates[-1]["changes"]["shared_smarthost"] == [False, True]


# -- lock templates ------------------------------------------------------------------------

def _domain_error(response) -> str:
    match = re.search(r'id="domain-error"[^>]*>([^<]*)</p>', response.get_data(as_text=True))
    assert match, "no error under domain"
    return " ".join(match.group(1).split())


def _template_named(name: str):
    return data.query(lambda s: s.scalar(select(LockTemplate).where(LockTemplate.name == name)))


def _choose_template(root: Panel, user: str, domain: str, template_id: int | str) -> None:
    response = root.post(f"/outgoing/users/{user_named(user).id}", settings(
        domain=domain, reauthenticate_as="domain", lock_template_id=str(template_id)))
    assert response.status_code == 302, response.get_data(as_text=True)[-1000:]


def test_a_template_other_customers_use_is_not_moved_to_one_customer(root, app):
    """Moved to one.example, one.example's admin could rewrite the notice two.example's
    senders get; so the move waits until no user outside one.example uses the template."""
    root.post("/outgoing/lock-templates/new", {"name": "Shared", "subject": "S", "body": "B",
                                               "domain": ""})
    shared = _template_named("Shared")
    data.add_user("two.example", "user", "dave@two.example", GOOD_PW)
    _choose_template(root, "carol@two.example", "two.example", shared.id)
    _choose_template(root, "dave@two.example", "two.example", shared.id)
    _choose_template(root, "seed@one.example", "one.example", shared.id)

    form = {"name": "Shared", "subject": "S", "body": "B", "domain": "one.example"}
    response = root.post(f"/outgoing/lock-templates/{shared.id}", form)
    assert response.status_code == 400
    assert _domain_error(response) == (
        "2 users outside one.example use this template; choose another lock template for "
        "them first.")
    assert _template_named("Shared").domain_id is None
    data.add_admin(OPS, OPS_PW, domain="one.example")
    ops = Panel(app.test_client()).login(OPS, OPS_PW)
    assert ops.post(f"/outgoing/lock-templates/{shared.id}",
                    {"name": "Shared", "subject": "Pay us", "body": "B"}).status_code == 404

    _choose_template(root, "carol@two.example", "two.example", "")
    _choose_template(root, "dave@two.example", "two.example", "")
    assert root.post(f"/outgoing/lock-templates/{shared.id}", form).status_code == 302
    assert _template_named("Shared").domain_id == data.query(
        lambda s: get_or_create_domain(s, "one.example").id)


def test_a_template_of_one_customer_is_not_moved_to_another_while_its_users_use_it(root):
    root.post("/outgoing/lock-templates/new", {"name": "Two's", "subject": "", "body": "",
                                               "domain": "two.example"})
    template = _template_named("Two's")
    _choose_template(root, "carol@two.example", "two.example", template.id)
    response = root.post(f"/outgoing/lock-templates/{template.id}",
                         {"name": "Two's", "subject": "", "body": "", "domain": "one.example"})
    assert response.status_code == 400
    assert _domain_error(response).startswith(
        "1 user outside one.example uses this template;")
    assert _template_named("Two's").domain_id == template.domain_id
    # Shared with every domain instead, it stays a template only super admins change.
    response = root.post(f"/outgoing/lock-templates/{template.id}",
                         {"name": "Two's", "subject": "", "body": "", "domain": ""})
    assert response.status_code == 302
    assert _template_named("Two's").domain_id is None


# -- the CLI ---------------------------------------------------------------------------------

def test_the_cli_goes_through_the_same_rules(app, other, redis_client):
    runner = app.test_cli_runner()
    whole = runner.invoke(args=["create-user", "one.example", "--ip", "0.0.0.0/0"])
    assert whole.exit_code != 0 and "open relay" in whole.output
    overlap = runner.invoke(args=["create-user", "one.example", "--ip", "10.2.0.4"])
    assert overlap.exit_code != 0 and "--confirm-overlap" in overlap.output
    assert user_named("10.2.0.4") is None
    version = redis_client.get(redis_keys.CONFIG_VERSION)
    confirmed = runner.invoke(args=["create-user", "one.example", "--ip", "10.2.0.4",
                                    "--confirm-overlap"])
    assert confirmed.exit_code == 0, confirmed.output
    # The proxies are told at once, as after a change in the panel.
    assert redis_client.get(redis_keys.CONFIG_VERSION) != version
    assert ("10.2.0.4", "one.example") in users()
    assert [e["overlap_confirmed"] for e in audit_events("create")
            if e["name"] == "10.2.0.4"] == [["10.2.0.0/28 (two.example)"]]
    login = runner.invoke(args=["create-user", "one.example", "--username", "x@one.example",
                                "--password", GOOD_PW])
    assert login.exit_code == 0, login.output
