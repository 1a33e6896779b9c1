"""A control-panel session ends for good: a copy of its cookie (from a shared machine, a
proxy's log, a stolen backup) stops working once the admin logs out or gets a new password,
and nothing of a session from before the login carries over into it."""

from __future__ import annotations

from tests.integration.test_panel_users import Panel
from tests.security.conftest import ROOT, ROOT_PW
from tests.support import data

PAGE = "/outgoing/users"


def copy_of(app, panel: Panel):
    """Another browser holding the same session cookie."""
    thief = app.test_client()
    thief.set_cookie("session", panel.client.get_cookie("session").value)
    assert thief.get(PAGE).status_code == 200
    return thief


def sent_to_login(client) -> bool:
    response = client.get(PAGE)
    return response.status_code == 302 and response.headers["Location"].startswith("/login")


def test_a_copied_session_cookie_stops_working_after_logout(app, root):
    thief = copy_of(app, root)
    assert root.post("/logout").status_code == 302
    assert sent_to_login(thief)
    assert sent_to_login(root.client)
    root.login(ROOT, ROOT_PW)  # logging in again makes a new session that works
    assert root.get(PAGE).status_code == 200
    assert sent_to_login(thief)


def test_a_new_password_ends_the_sessions_of_the_old_one(app, root):
    thief = copy_of(app, root)
    result = app.test_cli_runner().invoke(args=["create-admin", ROOT,
                                                "--password", "Other-pass-67890"])
    assert result.exit_code == 0, result.output
    assert sent_to_login(thief)
    assert sent_to_login(root.client)


def test_nothing_of_the_session_before_logging_in_carries_over(app):
    data.add_admin(ROOT, ROOT_PW)
    client = app.test_client()
    with client.session_transaction() as session:
        session["planted"] = "by someone else"
    Panel(client).login(ROOT, ROOT_PW)
    with client.session_transaction() as session:
        assert "planted" not in session
