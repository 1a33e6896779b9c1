"""A customer (domain admin) trying to open the relay or take another customer's addresses in
a real Chromium: each refusal appears in place, under the field, as they type and on submit."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from outgoing.models import OutgoingUser
from tests.e2e.test_panel_users import OPS, OPS_PW, SETTINGS_URL, login, open_manage_users, user
from tests.support import data

pytestmark = pytest.mark.browser


def test_a_customers_open_relay_and_takeover_are_refused_under_the_field(stack, page):
    data.add_admin(OPS, OPS_PW, domain="one.example")
    data.add_user("two.example", "ip", "203.0.113.0/28")
    login(page, stack.web_url, OPS, OPS_PW)
    open_manage_users(page)
    # The Domain is theirs, shown, and not an input.
    assert page.locator("#add-user input[name=domain]").count() == 0
    assert "one.example" in page.locator("#add-domain").inner_text()

    ip_range = page.get_by_label("IP/Range")
    ip_range.fill("0.0.0.0/0")
    ip_range.blur()  # the check as you type (HTMX, on change)
    message = page.locator("#ip_range-msg .error")
    message.wait_for()
    assert "open relay" in message.inner_text()

    ip_range.fill("203.0.113.5")
    page.get_by_role("button", name="Add & Configure").click()
    page.locator("#ip_range-msg .error", has_text="another customer").wait_for()
    assert "two.example" not in page.locator("#add-user").inner_text()
    assert data.query(lambda s: s.scalar(select(OutgoingUser.id).where(
        OutgoingUser.name == "203.0.113.5"))) is None

    ip_range.fill("198.51.100.7")  # their own server: added
    page.get_by_role("button", name="Add & Configure").click()
    page.wait_for_url(SETTINGS_URL, timeout=30_000)
    page.get_by_role("heading", name="Outgoing User Settings").wait_for()
    assert user("198.51.100.7").domain.name == "one.example"


# A name that ends a JavaScript string, and one that is markup: a domain admin may call its
# template anything, and a super admin's page lists it.
SCRIPT_NAME = "'+(document.title='pwned')+'<img src=x onerror=\"document.title='pwned'\">"


def test_a_customers_template_name_stays_text_on_the_providers_page(stack, page):
    """A domain admin names a lock template so that it would be script inside an inline
    handler; the super admin presses Delete on it, reads the name in the question, says no
    and then yes. Nothing of the name runs, and every page forbids inline script."""
    from outgoing.models import Domain, LockTemplate
    from tests.integration.test_panel_users import ROOT, ROOT_PW

    data.add_admin(OPS, OPS_PW, domain="one.example")
    data.add_admin(ROOT, ROOT_PW)

    def add(session):
        domain = session.scalar(select(Domain).where(Domain.name == "one.example"))
        session.add(LockTemplate(domain_id=domain.id, name=SCRIPT_NAME, subject="s", body="b"))
    data.query(add)
    login(page, stack.web_url, ROOT, ROOT_PW)
    response = page.goto(f"{stack.web_url}/outgoing/lock-templates")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    asked = []

    def answer(dialog, accept: bool) -> None:
        asked.append(dialog.message)
        dialog.accept() if accept else dialog.dismiss()

    page.once("dialog", lambda dialog: answer(dialog, False))
    row = page.get_by_role("row").filter(has_text="pwned")
    row.get_by_role("button", name="Delete").click()
    expect(row).to_be_visible()
    assert asked == [f"Delete the lock template {SCRIPT_NAME}? Its users get the built-in "
                     "template."]
    page.once("dialog", lambda dialog: answer(dialog, True))
    row.get_by_role("button", name="Delete").click()
    expect(page.get_by_role("row").filter(has_text="pwned")).to_have_count(0)
    assert "pwned" not in page.title()
