"""The ``next`` field of a row action (lock, unlock, reset; release in the quarantine) is
where the panel returns without JavaScript. A hand-made one holding a control character
(CR, LF) cannot go into a Location header: the action is done and the answer is the list,
never a 500."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from outgoing.models import OutgoingUser
from tests.integration.test_quarantine_web import hold
from tests.support import data
from tests.support.mail import GTUBE, message

BAD_NEXT = ["/outgoing/users\r\nSet-Cookie: x=1", "/outgoing/users\nX: 1",
            "/outgoing/users\r", "/outgoing/users\x0bx", "/outgoing/users\x7f"]


@pytest.mark.parametrize("target", BAD_NEXT)
def test_a_row_action_with_a_control_character_in_next_returns_to_the_list(root, bob, target):
    response = root.post(f"/outgoing/users/{bob}/lock", {"reason": "stolen", "next": target})
    assert response.status_code == 302
    assert response.headers["Location"] == "/outgoing/users"
    assert data.query(lambda s: s.scalar(select(OutgoingUser.locked)
                                         .where(OutgoingUser.id == bob)))


def test_an_identity_row_action_with_crlf_in_next_returns_to_the_list(root, bob):
    identity = data.add_identity(bob, "bob@example.com")
    response = root.post(f"/outgoing/identities/{identity}/reset",
                         {"next": "/outgoing/identities\r\nX: 1"})
    assert response.status_code == 302
    assert response.headers["Location"] == f"/outgoing/identities?user={bob}"


def test_a_quarantine_release_with_crlf_in_next_returns_to_the_quarantine(root, instance):
    row_id = hold("example.com", message(sender="alice@example.com", body=GTUBE),
                  sender="alice@example.com", subject="spam")
    response = root.post(f"/outgoing/quarantine/{row_id}/release",
                         {"next": "/outgoing/quarantine\r\nSet-Cookie: x=1"})
    assert response.status_code == 302
    assert response.headers["Location"] == "/outgoing/quarantine"


def test_a_plain_next_still_leads_back(root, bob):
    response = root.post(f"/outgoing/users/{bob}/reset", {"next": "/outgoing/users?q=bob"})
    assert response.headers["Location"] == "/outgoing/users?q=bob"
