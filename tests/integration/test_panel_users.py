"""Outgoing > Manage Authentication / Manage Users: "Add a user" and its checks, through
Flask's test client against the real database and Redis."""

from __future__ import annotations

import json
import re

import pytest
from sqlalchemy import select

from outgoing.models import AuditEvent, OutgoingUser
from outgoing.passwords import verify_password
from tests.support import data

ROOT, ROOT_PW = "root@example.net", "Root-pass-123"
GOOD_PW = "Alice-pass-123"


class Panel:
    """A logged-in browser session, as far as the test client can be one."""

    def __init__(self, client):
        self.client = client
        self.token = ""

    def login(self, email: str, password: str) -> Panel:
        page = self.client.get("/login").get_data(as_text=True)
        self.token = _csrf(page)
        response = self.client.post("/login", data={"email": email, "password": password,
                                                    "csrf_token": self.token})
        assert response.status_code == 302, response.get_data(as_text=True)[-500:]
        self.token = _csrf(self.client.get("/outgoing/users").get_data(as_text=True))
        return self

    def get(self, url: str, htmx: bool = False, **headers):
        if htmx:
            headers["HX-Request"] = "true"
        return self.client.get(url, headers=headers)

    def post(self, url: str, form: dict | None = None, htmx: bool = False, **headers):
        if htmx:
            headers["HX-Request"] = "true"
        return self.client.post(url, data={"csrf_token": self.token, **(form or {})},
                                headers=headers)

    def add(self, kind: str, domain: str, action: str = "configure", htmx: bool = False,
            **fields):
        return self.post("/outgoing/users", {"kind": kind, "domain": domain, "action": action,
                                             **fields}, htmx=htmx)


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', html).group(1)


def user_named(name: str) -> OutgoingUser | None:
    return data.query(lambda s: s.scalar(select(OutgoingUser).where(OutgoingUser.name == name)))


def text(response) -> str:
    return response.get_data(as_text=True)


@pytest.fixture
def root(app):
    data.add_admin(ROOT, ROOT_PW)
    data.add_user("example.com", "domain", "example.com", "Domain-pass-123")
    return Panel(app.test_client()).login(ROOT, ROOT_PW)


def test_add_and_configure_an_ip_range_opens_its_settings_page(root):
    response = root.add("ip", "example.com", ip_range="192.0.2.0/24")
    user = user_named("192.0.2.0/24")
    assert user is not None and user.kind == "ip"
    assert response.status_code == 302
    assert response.headers["Location"] == f"/outgoing/users/{user.id}"
    assert "Outgoing User Settings" in text(root.get(response.headers["Location"]))


def test_add_from_the_arrow_menu_saves_defaults_and_returns_to_the_list(root):
    response = root.add("user", "example.com", action="add", username="Alice@Example.com",
                        password=GOOD_PW, confirm_password=GOOD_PW)
    assert response.status_code == 302 and response.headers["Location"] == "/outgoing/users"
    alice = user_named("alice@example.com")
    assert alice.automatic_lock is True and alice.lock_timeout_minutes == 60
    assert alice.maximum_unlocks_by_timeout == 3 and alice.quarantine_response == "reject"
    assert verify_password(alice.password_hash, GOOD_PW)
    assert "alice@example.com" in text(root.get("/outgoing/users"))


def test_htmx_add_and_configure_redirects_the_browser_to_the_settings_page(root):
    response = root.add("ip", "example.com", ip_range="2001:db8::/64", htmx=True)
    user = user_named("2001:db8::/64")
    assert response.status_code == 204
    assert response.headers["HX-Redirect"] == f"/outgoing/users/{user.id}"


def test_adding_an_authenticating_domain_uses_the_domain_as_its_login(root):
    data.add_user("shop.example", "ip", "198.51.100.7")  # creates the domain
    response = root.add("domain", "shop.example", password=GOOD_PW, confirm_password=GOOD_PW)
    assert response.status_code == 302
    user = data.query(lambda s: s.scalar(select(OutgoingUser).where(
        OutgoingUser.kind == "domain", OutgoingUser.name == "shop.example")))
    assert user is not None and verify_password(user.password_hash, GOOD_PW)


def test_htmx_add_with_a_bad_ip_renders_the_error_in_place_and_adds_nothing(root):
    response = root.add("ip", "example.com", ip_range="192.0.2.300", htmx=True)
    assert response.status_code == 400
    body = text(response)
    assert body.lstrip().startswith('<section class="card" id="add-user"')
    assert "is not a valid IPv4 or IPv6 address" in body
    assert 'value="192.0.2.300"' in body  # what was typed stays in the field
    assert user_named("192.0.2.300") is None


@pytest.mark.parametrize("ip_range, message", [
    ("10.0.0.9-10.0.0.1", "the first address is after the last one"),
    ("10.0.0.1-2001:db8::1", "both ends of a range must be IPv4, or both IPv6"),
    ("10.0.0.0/33", "an IPv4 prefix is at most /32"),
    ("10.0.0.1/24", "did you mean 10.0.0.0/24?"),
    ("", "Enter an IP address"),
])
def test_ip_ranges_are_checked_with_a_clear_message(root, ip_range, message):
    response = root.add("ip", "example.com", ip_range=ip_range)
    assert response.status_code == 400
    assert message in text(response)


def test_a_range_crossing_another_of_the_same_domain_is_refused(root):
    data.add_user("example.com", "ip", "10.1.0.0/16")
    response = root.add("ip", "example.com", ip_range="10.0.255.0-10.1.2.9")
    assert response.status_code == 400
    assert "overlaps 10.1.0.0/16" in text(response)
    data.add_user("other.example", "ip", "172.16.0.1")
    response = root.add("ip", "other.example", ip_range="10.1.2.0-10.1.2.9")
    assert response.status_code == 400  # another domain's addresses: only once confirmed
    response = root.add("ip", "other.example", ip_range="10.1.2.0-10.1.2.9",
                        confirm_overlap="y")
    assert response.status_code == 302


def test_a_username_can_be_added_only_once(root):
    data.add_user("example.com", "user", "bob@example.com", GOOD_PW)
    response = root.add("user", "example.com", username="BOB@example.com",
                        password=GOOD_PW, confirm_password=GOOD_PW)
    assert response.status_code == 400
    assert "This username (bob@example.com) already exists." in text(response)


@pytest.mark.parametrize("password, confirm, message", [
    (GOOD_PW, "Alice-pass-124", "Confirm Password does not match Password."),
    ("Short-1", "Short-1", "Use at least 10 characters."),
    ("alllowercaseletters", "alllowercaseletters", "Mix at least two of"),
    ("", "", "Enter a password."),
])
def test_passwords_must_be_confirmed_and_strong_enough(root, password, confirm, message):
    response = root.add("user", "example.com", username="carol@example.com",
                        password=password, confirm_password=confirm)
    assert response.status_code == 400
    assert message in text(response)
    assert user_named("carol@example.com") is None


@pytest.mark.parametrize("domain, message", [
    ("not a domain", "is not a valid domain name"),
    ("-bad-.example", "is not a valid domain name"),
    ("missing.example", "There is no domain missing.example"),
])
def test_the_domain_must_be_a_valid_existing_domain_name(root, domain, message):
    response = root.add("ip", domain, ip_range="203.0.113.5")
    assert response.status_code == 400
    assert message in text(response)


def test_an_internationalised_domain_name_is_found_by_its_idna_form(root):
    data.add_user("xn--bcher-kva.example", "ip", "203.0.113.1")
    response = root.add("ip", "Bücher.example", ip_range="203.0.113.9")
    assert response.status_code == 302
    assert user_named("203.0.113.9").domain.name == "xn--bcher-kva.example"


def test_each_field_is_checked_as_it_is_filled_in(root):
    data.add_user("example.com", "ip", "10.9.0.0/16")
    form = {"kind": "ip", "domain": "example.com", "ip_range": "10.8.255.0-10.9.0.7"}
    response = root.post("/outgoing/users/check", form, htmx=True,
                         **{"HX-Trigger-Name": "ip_range"})
    body = text(response)
    assert response.status_code == 200
    assert body.lstrip().startswith('<div class="field-message" id="ip_range-msg"')
    assert "overlaps 10.9.0.0/16" in body
    form["ip_range"] = "10.10.0.1"
    assert 'class="error"' not in text(root.post("/outgoing/users/check", form, htmx=True,
                                                 **{"HX-Trigger-Name": "ip_range"}))
    weak = {"kind": "user", "domain": "example.com", "password": "short"}
    assert "Use at least 10 characters." in text(root.post(
        "/outgoing/users/check", weak, htmx=True, **{"HX-Trigger-Name": "password"}))
    assert user_named("10.8.255.0-10.9.0.7") is None and user_named("10.10.0.1") is None


def test_adding_a_user_is_audited_and_announced_to_the_proxies(root, redis_client):
    before = int(redis_client.get("og:config-version") or 0)
    root.add("ip", "example.com", ip_range="192.0.2.44")
    user = user_named("192.0.2.44")
    events = data.query(lambda s: [(e.actor, e.action, e.target_id, json.loads(e.detail))
                                   for e in s.scalars(select(AuditEvent))])
    assert [(a, act, tid) for a, act, tid, _ in events] == [(ROOT, "create", user.id)]
    assert events[0][3]["after"]["name"] == "192.0.2.44"
    assert int(redis_client.get("og:config-version")) == before + 1


def test_the_add_form_has_three_tabs_and_labelled_fields(root):
    html = text(root.get("/outgoing/users?kind=user"))
    tabs = re.findall(r'role="tab"[^>]*>([^<]+)</a>', html)
    assert tabs == ["Authenticating IP or Range", "Authenticating User",
                    "Authenticating Domain"]
    for field_id, label in [("domain", "Domain"), ("ip_range", "IP/Range"),
                            ("username", "Username"), ("password", "Password"),
                            ("confirm_password", "Confirm Password")]:
        assert f'<label for="{field_id}">{label}</label>' in html
    assert 'aria-selected="true">Authenticating User' in html
    assert ">Add &amp; Configure</button>" in html and 'value="add"' in html
