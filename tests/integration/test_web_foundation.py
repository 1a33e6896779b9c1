"""Logging in, CSRF, domain scoping and the admin CLI, through Flask's test client."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from outgoing.models import Admin, Domain, OutgoingUser
from tests.support import data
from tests.support.web import csrf_token, log_in


@pytest.fixture
def web(app):
    return app.test_client()


def test_login_page_has_email_and_password_labels(web):
    html = web.get("/login").get_data(as_text=True)
    assert '<label for="email">Email</label>' in html
    assert '<label for="password">Password</label>' in html


def test_super_admin_logs_in_and_sees_manage_authentication(web):
    data.add_admin("root@example.net", "Root-pass-123")
    response = log_in(web, "root@example.net", "Root-pass-123")
    assert response.status_code == 302
    page = web.get("/outgoing/users").get_data(as_text=True)
    assert "Manage Authentication" in page


def test_wrong_password_does_not_log_in(web):
    data.add_admin("root@example.net", "Root-pass-123")
    response = log_in(web, "root@example.net", "nope")
    assert response.status_code == 400
    assert web.get("/outgoing/users").status_code == 302


def test_login_without_csrf_token_is_refused(web):
    data.add_admin("root@example.net", "Root-pass-123")
    response = web.post("/login", data={"email": "root@example.net", "password": "Root-pass-123"})
    assert response.status_code == 400
    assert web.get("/outgoing/users").status_code == 302


def test_admin_passwords_are_stored_hashed(app):
    data.add_admin("root@example.net", "Root-pass-123")
    stored = data.query(lambda s: s.scalar(select(Admin.password_hash)))
    assert "Root-pass-123" not in stored and stored.startswith(("scrypt:", "pbkdf2:"))


def test_add_authenticating_user_then_unlock_row_via_htmx(web, redis_client):
    data.add_admin("root@example.net", "Root-pass-123")
    data.add_user("example.com", "domain", "example.com", "Domain-pass-123")
    log_in(web, "root@example.net", "Root-pass-123")
    token = csrf_token(web, "/outgoing/users")
    response = web.post("/outgoing/users", data={
        "csrf_token": token, "kind": "user", "domain": "example.com",
        "username": "alice@example.com", "password": "Alice-pass-123",
        "confirm_password": "Alice-pass-123"})
    assert response.status_code == 302
    alice = data.query(lambda s: s.scalar(select(OutgoingUser).where(
        OutgoingUser.name == "alice@example.com")))
    assert alice.password_hash and "Alice-pass-123" not in alice.password_hash
    assert redis_client.get("og:config-version") is not None

    locked = web.post(f"/outgoing/users/{alice.id}/lock", data={"csrf_token": token},
                      headers={"HX-Request": "true"})
    assert locked.status_code == 200
    assert locked.get_data(as_text=True).lstrip().startswith(f'<tr id="user-{alice.id}"')
    assert redis_client.exists(f"og:{{{alice.id}}}:lock")
    unlocked = web.post(f"/outgoing/users/{alice.id}/unlock", data={"csrf_token": token},
                        headers={"HX-Request": "true"})
    assert "Unlocked" in unlocked.get_data(as_text=True)
    assert not redis_client.exists(f"og:{{{alice.id}}}:lock")


def test_domain_admin_gets_404_for_another_domains_user(web):
    data.add_admin("ops@one.example", "Ops-pass-1234", domain="one.example")
    other = data.add_user("two.example", "user", "bob@two.example", "Bob-pass-1234")
    log_in(web, "ops@one.example", "Ops-pass-1234")
    token = csrf_token(web, "/outgoing/users")
    for action in ("lock", "unlock", "reset"):
        response = web.post(f"/outgoing/users/{other}/{action}", data={"csrf_token": token})
        assert response.status_code == 404
    page = web.get("/outgoing/users").get_data(as_text=True)
    assert "Manage Users" in page and "bob@two.example" not in page


def test_domain_admin_cannot_add_a_user_to_another_domain(web):
    data.add_admin("ops@one.example", "Ops-pass-1234", domain="one.example")
    data.add_user("two.example", "domain", "two.example", "Two-pass-12345")
    log_in(web, "ops@one.example", "Ops-pass-1234")
    response = web.post("/outgoing/users", data={
        "csrf_token": csrf_token(web, "/outgoing/users"), "kind": "user",
        "domain": "two.example", "username": "eve@two.example",
        "password": "Eve-pass-12345", "confirm_password": "Eve-pass-12345"})
    assert response.status_code == 404
    assert data.query(lambda s: s.scalar(select(OutgoingUser).where(
        OutgoingUser.name == "eve@two.example"))) is None


def test_create_admin_cli_makes_super_and_domain_admins(app):
    runner = app.test_cli_runner()
    result = runner.invoke(args=["create-admin", "Root@Example.net", "--password", "Pw-123456789"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(args=["create-domain", "example.com"]).exit_code == 0
    result = runner.invoke(args=["create-admin", "ops@example.com", "--password",
                                 "Pw-123456789", "--domain", "example.com"])
    assert "domain admin of example.com" in result.output
    admins = data.query(lambda s: {a.email: a.domain_id for a in s.scalars(select(Admin))})
    assert admins["root@example.net"] is None
    assert admins["ops@example.com"] is not None


@pytest.mark.parametrize("password, message", [
    ("Short-1", "Use at least 10 characters."),
    ("alllowercaseletters", "Mix at least two of"),
])
def test_create_admin_refuses_a_password_the_panel_would_refuse(app, password, message):
    result = app.test_cli_runner().invoke(args=["create-admin", "root@example.net",
                                                "--password", password])
    assert result.exit_code != 0 and message in result.output
    assert data.query(lambda s: s.scalars(select(Admin)).all()) == []


@pytest.mark.parametrize("email", ["root", "root@", "root@@example.net", "ro ot@example.net",
                                   "root@example", "root@exa mple.net", "@example.net"])
def test_create_admin_refuses_what_is_not_an_email_address(app, email):
    result = app.test_cli_runner().invoke(args=["create-admin", email, "--password",
                                                "Pw-123456789"])
    assert result.exit_code != 0 and "not a valid email address" in result.output
    assert data.query(lambda s: s.scalars(select(Admin)).all()) == []


def test_create_admin_takes_the_local_first_admin_address(app):
    result = app.test_cli_runner().invoke(args=["create-admin", "admin@localhost",
                                                "--password", "Pw-123456789"])
    assert result.exit_code == 0, result.output
    assert data.query(lambda s: s.scalars(select(Admin.email)).all()) == ["admin@localhost"]


def test_create_admin_with_a_mistyped_domain_makes_no_stray_domain(app):
    runner = app.test_cli_runner()
    runner.invoke(args=["create-domain", "example.com"])
    result = runner.invoke(args=["create-admin", "ops@example.com", "--password",
                                 "Pw-123456789", "--domain", "exmaple.com"])
    assert result.exit_code != 0
    assert "there is no domain 'exmaple.com'" in result.output
    assert data.query(lambda s: s.scalars(select(Domain.name)).all()) == ["example.com"]
    assert data.query(lambda s: s.scalars(select(Admin)).all()) == []

    result = runner.invoke(args=["create-admin", "ops@new.example", "--password",
                                 "Pw-123456789", "--domain", "new.example", "--create-domain"])
    assert result.exit_code == 0, result.output
    assert "domain admin of new.example" in result.output
    assert sorted(data.query(lambda s: s.scalars(select(Domain.name)).all())) == [
        "example.com", "new.example"]
