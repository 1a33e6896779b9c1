"""The Compromise detection section's thresholds: the ladder must climb."""

from __future__ import annotations

import re

import pytest

from outgoing import held
from tests.integration.test_panel_settings import PW, bob, load, root, settings  # noqa: F401
from tests.integration.test_panel_users import Panel, text
from tests.support import data


def detection(throttle: str, hold: str, lock: str) -> dict:
    return settings(compromise_detection="y", detection_throttle_at=throttle,
                    detection_hold_at=hold, detection_lock_at=lock,
                    detection_throttle_rate="10", detection_new_sender_allowance="20",
                    detection_release_pace="30")


def error_under(html: str, field: str) -> str:
    """The field's own block (up to the next field), where its error is shown."""
    start = html.index(f'id="field-{field}"')
    end = html.find('id="field-', start + 1)
    return html[start:end if end > 0 else len(html)]


@pytest.mark.parametrize("throttle, hold, lock, field, message", [
    ("200", "100", "400", "detection_hold_at", "Hold must start at or above Throttle (200)."),
    ("60", "500", "400", "detection_lock_at", "Lock must start at or above Hold (500)."),
    ("600", "0", "400", "detection_lock_at", "Lock must start at or above Throttle (600)."),
])
def test_thresholds_out_of_order_are_an_error_under_the_field(root, bob, throttle, hold,  # noqa: F811
                                                               lock, field, message):
    before = load(bob)
    response = root.post(f"/outgoing/users/{bob}", detection(throttle, hold, lock))
    assert response.status_code == 400
    assert message in error_under(text(response), field)
    after = load(bob)
    assert (after.detection_throttle_at, after.detection_hold_at, after.detection_lock_at) == (
        before.detection_throttle_at, before.detection_hold_at, before.detection_lock_at)


@pytest.mark.parametrize("throttle, hold, lock", [
    ("50", "50", "50"), ("30", "90", "300"), ("0", "100", "0"), ("80", "0", "200")])
def test_thresholds_in_order_or_off_are_saved(root, bob, throttle, hold, lock):  # noqa: F811
    assert root.post(f"/outgoing/users/{bob}", detection(throttle, hold, lock)).status_code == 302
    user = load(bob)
    assert (user.detection_throttle_at, user.detection_hold_at, user.detection_lock_at) == (
        int(throttle), int(hold), int(lock))


def test_new_users_start_in_shadow_mode_unless_the_provider_chooses_to_enforce(
        app, root):  # noqa: F811
    """Shipped default: detection on, in shadow mode. The provider's choice on Outgoing >
    Settings applies to users added afterwards and changes no existing user."""
    first = load(data.add_user("example.com", "user", "first@example.com", PW))
    assert first.compromise_detection is True and first.detection_shadow_mode is True
    html = text(root.get(f"/outgoing/settings/{first.domain_id}"))
    assert re.search(r'<option (selected )?value="shadow"( selected)?>On, in shadow mode'
                     r'</option>', html).group(0).count("selected") == 1

    response = root.post("/outgoing/settings/detection-default",
                         {"detection_default": held.DEFAULT_ON})
    assert response.status_code == 302
    second = load(data.add_user("example.com", "user", "second@example.com", PW))
    assert second.compromise_detection is True and second.detection_shadow_mode is False
    assert load(first.id).detection_shadow_mode is True


def test_a_domain_admin_cannot_change_the_default_for_new_users(app, root):  # noqa: F811
    data.add_admin("ops@example.com", "Ops-pass-12345", domain="example.com")
    ops = Panel(app.test_client()).login("ops@example.com", "Ops-pass-12345")
    response = ops.post("/outgoing/settings/detection-default",
                        {"detection_default": held.DEFAULT_OFF})
    assert response.status_code == 404
    assert data.query(held.detection_default) == held.DEFAULT_SHADOW
    own = ops.get("/outgoing/settings")
    own = ops.get(own.headers["Location"]) if own.status_code == 302 else own
    assert own.status_code == 200 and "for new users" not in text(own)
