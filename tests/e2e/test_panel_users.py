"""The control panel as a new administrator uses it, in a real Chromium against gunicorn."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from outgoing.models import OutgoingUser
from tests.support import data

pytestmark = pytest.mark.browser

ADMIN, ADMIN_PW = "admin@example.net", "Admin-pass-123"
OPS, OPS_PW = "ops@one.example", "Ops-pass-12345"
SETTINGS_URL = re.compile(r".*/outgoing/users/\d+$")


def login(page, base: str, email: str, password: str) -> None:
    page.goto(f"{base}/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("heading", level=1).wait_for()


def open_manage_authentication(page) -> None:
    page.get_by_text("Outgoing", exact=True).click()
    page.get_by_role("link", name="Manage Authentication").click()
    page.get_by_role("heading", name="Add a user").wait_for()
    page.wait_for_load_state()  # the page's scripts run before a test clicks a tab


def back_to_the_list(page) -> None:
    """From a user's settings to Manage Authentication, once its scripts run (tabs)."""
    page.get_by_role("link", name="Back to the list").click()
    page.get_by_role("heading", name="Add a user").wait_for()
    page.wait_for_load_state()


def open_manage_users(page) -> None:
    """Manage Users, once its scripts run: a search typed before htmx binds is never sent."""
    page.get_by_text("Outgoing", exact=True).click()
    page.get_by_role("link", name="Manage Users").click()
    page.get_by_role("heading", name="Add a user").wait_for()
    page.wait_for_load_state()


def user(name: str) -> OutgoingUser:
    def fetch(session):
        found = session.scalar(select(OutgoingUser).where(OutgoingUser.name == name))
        found.identification_headers  # noqa: B018 - load while the session is open
        return found
    return data.query(fetch)


def screenshot(page, path) -> None:
    """The whole page as it looks at the top, with sticky bars where they belong."""
    size = page.viewport_size
    page.evaluate("window.scrollTo(0, 0)")
    height = page.evaluate("document.documentElement.scrollHeight")
    page.set_viewport_size({"width": size["width"], "height": height})
    page.screenshot(path=str(path))
    page.set_viewport_size(size)


def save(page) -> None:
    page.get_by_role("button", name="Save").click()
    page.get_by_text("Saved.").wait_for()


def test_admin_adds_one_user_of_each_type_with_add_and_configure_and_changes_settings(
        stack, page, artifacts):
    stack.flask("create-domain", "example.com")
    stack.flask("create-admin", ADMIN, "--password", ADMIN_PW)
    login(page, stack.web_url, ADMIN, ADMIN_PW)
    open_manage_authentication(page)

    # An IP range: identities from two headers, connection limits, accept quarantined mail.
    page.get_by_label("Domain").fill("example.com")
    page.get_by_label("IP/Range").fill("192.0.2.0/24")
    screenshot(page, artifacts / "panel-add-user.png")
    page.get_by_role("button", name="Add & Configure").click()
    page.wait_for_url(SETTINGS_URL)
    assert page.get_by_label("IP/Range").input_value() == "192.0.2.0/24"
    assert page.get_by_label("IP/Range").get_attribute("readonly") is not None
    assert not page.get_by_label("Limit per hour").is_visible()
    page.get_by_label("Identification Method").select_option(label="Header")
    page.get_by_label("Header name").fill("X-Client-ID")
    page.get_by_label("Regular expression").fill(r"^client-(\d+)$")
    page.get_by_label("Remove header").check()
    page.get_by_role("button", name="+ Add header").click()  # a new row, from the server
    page.get_by_label("Header name").nth(1).fill("X-Customer")
    page.get_by_role("button", name="+ Add header").click()  # one too many: deleted again
    page.get_by_label("Header name").nth(2).fill("X-Mistake")
    page.get_by_role("button", name="Delete row").nth(2).click()
    expect(page.get_by_label("Header name")).to_have_count(2)
    page.get_by_label("Automatic lock").uncheck()  # a smarthost: see the help text
    page.get_by_label("Enable outgoing connection limits").check()
    page.get_by_label("Limit per hour").fill("1000")
    page.get_by_label("Limit per minute").fill("60")
    page.get_by_label("Quarantine Response").select_option(label="Accepted (250)")
    page.get_by_label("Re-authenticate as").select_option(
        label="Authenticating User matching the envelope sender")
    save(page)
    screenshot(page, artifacts / "panel-user-settings.png")
    ip = user("192.0.2.0/24")
    assert ip.identification_method == "header" and ip.automatic_lock is False
    assert [(h.header_name, h.regex, h.remove_header) for h in ip.identification_headers] == [
        ("X-Client-ID", r"^client-(\d+)$", True), ("X-Customer", None, False)]
    assert (ip.limit_per_hour, ip.limit_per_minute, ip.quarantine_response,
            ip.reauthenticate_as) == (1000, 60, "accept", "user")

    # An authenticating user that may be relayed for.
    back_to_the_list(page)
    page.get_by_role("tab", name="Authenticating User").click()
    page.get_by_label("Username").fill("alice@example.com")
    page.get_by_label("Password", exact=True).fill("Alice-pass-123")
    page.get_by_label("Confirm Password").fill("Alice-pass-123")
    page.get_by_role("button", name="Add & Configure").click()
    page.wait_for_url(SETTINGS_URL)
    assert page.get_by_label("Username").input_value() == "alice@example.com"
    page.get_by_label("Re-authenticate permitted").check()
    page.get_by_label("Maximum number of recipients per day").fill("500")
    save(page)
    alice = user("alice@example.com")
    assert alice.reauthenticate_permitted is True and alice.maximum_recipients_per_day == 500

    # The domain login.
    back_to_the_list(page)
    page.get_by_role("tab", name="Authenticating Domain").click()
    page.get_by_label("Password", exact=True).fill("Domain-pass-123")
    page.get_by_label("Confirm Password").fill("Domain-pass-123")
    page.get_by_role("button", name="Add & Configure").click()
    page.wait_for_url(SETTINGS_URL)
    page.get_by_label("User and Identity Lock timeout").fill("30")
    save(page)
    assert data.query(lambda s: s.scalar(select(OutgoingUser.lock_timeout_minutes).where(
        OutgoingUser.kind == "domain"))) == 30

    back_to_the_list(page)
    rows = page.locator("#user-rows tr")
    expect(rows).to_have_count(3)
    assert [r.get_attribute("data-name") for r in rows.all()] == [
        "192.0.2.0/24", "alice@example.com", "example.com"]


def test_validation_errors_appear_in_place_without_reloading_the_page(stack, page):
    stack.flask("create-domain", "example.com")
    stack.flask("create-admin", ADMIN, "--password", ADMIN_PW)
    data.add_user("example.com", "ip", "10.0.0.0/16")
    login(page, stack.web_url, ADMIN, ADMIN_PW)
    open_manage_authentication(page)
    page.evaluate("window.__samePage = true")

    page.get_by_label("Domain").fill("example.com")
    page.get_by_label("IP/Range").fill("10.0.255.0-10.1.0.5")  # crosses 10.0.0.0/16
    page.get_by_label("IP/Range").blur()  # checked as soon as it is filled in
    page.get_by_text("overlaps 10.0.0.0/16").wait_for()
    page.get_by_label("IP/Range").fill("192.0.2.300")
    page.get_by_role("button", name="Add & Configure").click()
    page.locator("#add-user").get_by_text("is not a valid IPv4 or IPv6 address").wait_for()
    assert page.get_by_label("IP/Range").input_value() == "192.0.2.300"

    page.get_by_role("tab", name="Authenticating User").click()
    page.get_by_label("Password", exact=True).fill("short")
    page.get_by_label("Password", exact=True).blur()
    page.get_by_text("Use at least 10 characters.").wait_for()
    assert page.evaluate("window.__samePage") is True

    page.get_by_role("link", name="10.0.0.0/16").click()
    page.wait_for_url(SETTINGS_URL)
    page.get_by_role("heading", name="Outgoing User Settings").wait_for()
    page.evaluate("window.__samePage = true")
    page.get_by_label("User and Identity Lock timeout").fill("0")
    page.get_by_role("button", name="Save").click()
    page.get_by_text("Enter 1 to 10080 minutes").wait_for()
    assert page.evaluate("window.__samePage") is True
    assert user("10.0.0.0/16").lock_timeout_minutes == 60


def test_admin_locks_and_unlocks_a_user_from_the_list(stack, page, redis_client, artifacts):
    """Lock asks for its reason in the row itself: no pop-up that a browser or a tool could
    dismiss, Cancel puts the row back, and the reason typed is the lock's reason."""
    stack.flask("create-admin", ADMIN, "--password", ADMIN_PW)
    bob = data.add_user("example.com", "user", "bob@example.com", "Bob-pass-12345")
    shop = data.add_identity(bob, "shop-42")
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    login(page, stack.web_url, ADMIN, ADMIN_PW)
    open_manage_authentication(page)
    page.evaluate("window.__samePage = true")
    row = page.locator(f"#user-{bob}")
    row.get_by_role("button", name="Lock").click()
    row.get_by_label("Lock reason").wait_for()
    expect(row.get_by_label("Lock reason")).to_be_focused()
    row.get_by_role("link", name="Cancel").click()
    # The form's own submit button is also called Lock: wait for the form to go.
    expect(row.get_by_label("Lock reason")).to_have_count(0)
    row.get_by_role("button", name="Lock").wait_for()
    assert not redis_client.exists(f"og:{{{bob}}}:lock")

    row.get_by_role("button", name="Lock").click()
    row.get_by_label("Lock reason").fill("customer complaint")
    screenshot(page, artifacts / "panel-lock-inline.png")
    row.get_by_role("button", name="Lock").click()
    page.locator(f"#user-{bob}", has_text="Manual").wait_for()
    assert "customer complaint" in page.locator(f"#user-{bob}").inner_text()
    assert redis_client.exists(f"og:{{{bob}}}:lock")
    assert user("bob@example.com").lock_reason == "customer complaint"
    page.locator(f"#user-{bob}").get_by_role("button", name="Unlock").click()
    page.locator(f"#user-{bob}", has_text="Unlocked").wait_for()
    assert not redis_client.exists(f"og:{{{bob}}}:lock")
    assert page.evaluate("window.__samePage") is True

    page.goto(f"{stack.web_url}/outgoing/identities")
    row = page.locator(f"#identity-{shop}")
    row.get_by_role("button", name="Lock").click()
    row.get_by_label("Lock reason").fill("hacked shop")
    row.get_by_label("Lock reason").press("Enter")
    page.locator(f"#identity-{shop}", has_text="Manual").wait_for()
    assert "hacked shop" in page.locator(f"#identity-{shop}").inner_text()
    assert redis_client.exists(f"og:{{{bob}}}:idlock:shop-42")
    assert dialogs == []


def test_a_domain_admin_cannot_reach_another_domains_user(stack, page):
    data.add_admin(OPS, OPS_PW, domain="one.example")
    data.add_user("one.example", "user", "alice@one.example", "Alice-pass-1234")
    other = data.add_user("two.example", "user", "bob@two.example", "Bob-pass-12345")
    login(page, stack.web_url, OPS, OPS_PW)
    open_manage_users(page)
    assert "alice@one.example" in page.locator("#user-rows").inner_text()
    page.get_by_label("Search").fill("bob")
    page.get_by_text("No outgoing users match").wait_for()
    response = page.goto(f"{stack.web_url}/outgoing/users/{other}")
    assert response.status == 404
    assert page.get_by_role("heading", name="Not found").is_visible()
    assert "bob@two.example" not in page.content()


@pytest.mark.parametrize("path, no_match", [
    ("/outgoing/users", "No outgoing users match"),
    ("/outgoing/quarantine", "No quarantined messages match"),
])
def test_a_search_typed_while_the_page_loads_is_not_lost(stack, page, path, no_match):
    data.add_admin(OPS, OPS_PW, domain="one.example")
    data.add_user("one.example", "user", "alice@one.example", "Alice-pass-1234")
    login(page, stack.web_url, OPS, OPS_PW)
    held = []
    page.route("**/static/htmx-*.js", lambda route: held.append(route))  # until the test says
    page.goto(f"{stack.web_url}{path}", wait_until="commit")
    page.get_by_label("Search").fill("bob")
    assert page.get_by_text(no_match).count() == 0  # the page as served, before any search
    for _ in range(250):  # the route's handler runs as Playwright's messages are read
        if held:
            break
        page.wait_for_timeout(20)
    held[0].continue_()
    page.get_by_text(no_match).wait_for()


def test_add_from_the_arrow_menu_saves_defaults_and_stays_on_the_list(stack, page):
    stack.flask("create-domain", "example.com")
    stack.flask("create-admin", ADMIN, "--password", ADMIN_PW)
    login(page, stack.web_url, ADMIN, ADMIN_PW)
    open_manage_authentication(page)
    assert page.get_by_label("Domain").input_value() == "example.com"  # the only domain
    page.get_by_label("IP/Range").fill("198.51.100.0-198.51.100.20")
    page.get_by_label("More add options").click()
    page.get_by_role("button", name="Add", exact=True).click()
    page.get_by_role("status").filter(has_text="with the default settings").wait_for()
    assert page.locator("#user-rows tr").first.get_attribute("data-name") == \
        "198.51.100.0-198.51.100.20"
    added = user("198.51.100.0-198.51.100.20")
    assert (added.automatic_lock, added.lock_timeout_minutes, added.quarantine_response) == (
        True, 60, "reject")
