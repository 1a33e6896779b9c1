"""The Compromise detection section of Outgoing User Settings, set by its labels in Chromium."""

from __future__ import annotations

import pytest

from outgoing.models import OutgoingUser
from tests.e2e.test_panel_users import ADMIN, ADMIN_PW, login, save
from tests.support import data

pytestmark = pytest.mark.browser


def test_admin_sets_the_compromise_detection_section_by_its_labels(stack, page):
    stack.flask("create-admin", ADMIN, "--password", ADMIN_PW)
    bob = data.add_user("example.com", "user", "bob@example.com", "Bob-pass-12345")
    login(page, stack.web_url, ADMIN, ADMIN_PW)
    page.goto(f"{stack.web_url}/outgoing/users/{bob}")
    page.get_by_label("Compromise detection", exact=True).check()
    page.get_by_label("Shadow mode").uncheck()
    page.get_by_label("Throttle at risk").fill("50")
    page.get_by_label("Hold at risk").fill("150")
    page.get_by_label("Lock at risk").fill("500")
    page.get_by_label("Throttle rate (messages per minute)").fill("7")
    page.get_by_label("New sender allowance (messages per hour)").fill("25")
    page.get_by_label("Release pace (messages per minute)").fill("12")
    save(page)

    stored = data.query(lambda s: s.get(OutgoingUser, bob))
    assert stored.compromise_detection is True and stored.detection_shadow_mode is False
    assert (stored.detection_throttle_at, stored.detection_hold_at, stored.detection_lock_at,
            stored.detection_throttle_rate, stored.detection_new_sender_allowance,
            stored.detection_release_pace) == (50, 150, 500, 7, 25, 12)

    # Out of order: the error shows under Hold and nothing changes.
    page.get_by_label("Hold at risk").fill("40")
    page.get_by_role("button", name="Save").click()
    page.get_by_text("Hold must start at or above Throttle (50).").wait_for()
    assert data.query(lambda s: s.get(OutgoingUser, bob).detection_hold_at) == 150
