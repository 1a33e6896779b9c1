"""A customer (domain admin) trying to open the relay or take another customer's addresses in
a real Chromium: each refusal appears in place, under the field, as they type and on submit."""

from __future__ import annotations

import pytest
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
