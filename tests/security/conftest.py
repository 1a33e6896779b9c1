"""What the panel's security tests share: a provider (super admin) logged in, and a user."""

from __future__ import annotations

import pytest

from tests.integration.test_panel_users import Panel
from tests.support import data

ROOT, ROOT_PW = "root@example.net", "Root-pass-12345"


@pytest.fixture
def root(app) -> Panel:
    """A super admin's panel session."""
    data.add_admin(ROOT, ROOT_PW)
    return Panel(app.test_client()).login(ROOT, ROOT_PW)


@pytest.fixture
def bob(app) -> int:
    """The id of an authenticating user of example.com."""
    return data.add_user("example.com", "user", "bob@example.com", "Bob-pass-12345")
