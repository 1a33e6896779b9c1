"""Blocked logins in the control panel: what each admin sees, and clearing a block so the
proxy lets the next AUTH through."""

from __future__ import annotations

import base64

import pytest
from sqlalchemy import select

from outgoing.models import AuditEvent
from tests.support import data
from tests.support.mail import client
from tests.support.web import csrf_token, log_in

PAGE = "/outgoing/blocked-logins"


def auth(port: int, login: str, password: str, source: str) -> int:
    blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    with client(port, source=source) as smtp:
        return smtp.docmd("AUTH", f"PLAIN {blob}")[0]


def fail_twice(port: int, login: str, source: str) -> None:
    for _ in range(2):
        assert auth(port, login, "wrong-password", source) == 535


@pytest.fixture
def web(app):
    return app.test_client()


@pytest.fixture
def proxy(start_proxy):
    return start_proxy(AUTH_FAILURE_LIMIT=2)


@pytest.fixture
def users(instance):
    data.add_user("one.example", "user", "alice@one.example", "Alice-pass-123")
    data.add_user("two.example", "user", "bob@two.example", "Bob-pass-1234")


def test_super_admin_sees_blocked_addresses_and_usernames_and_clears_them(web, users,
                                                                           proxy):
    fail_twice(proxy.port, "alice@one.example", "127.0.3.1")  # the address and alice
    fail_twice(proxy.port, "bob@two.example", "127.0.3.2")  # another address and bob
    assert auth(proxy.port, "alice@one.example", "Alice-pass-123", "127.0.3.1") == 454
    data.add_admin("root@example.net", "Root-pass-123")
    log_in(web, "root@example.net", "Root-pass-123")
    page = web.get(PAGE).get_data(as_text=True)
    for value in ("127.0.3.1", "127.0.3.2", "alice@one.example", "bob@two.example"):
        assert value in page
    assert "Client address" in page and "Username" in page

    token = csrf_token(web, PAGE)
    response = web.post(f"{PAGE}/clear", data={"csrf_token": token,
                                               "subject": "ip:127.0.3.1"})
    assert response.status_code == 302
    # The username is still blocked, from any address.
    assert auth(proxy.port, "alice@one.example", "Alice-pass-123", "127.0.3.1") == 454
    web.post(f"{PAGE}/clear", data={"csrf_token": token, "subject": "user:alice@one.example"})
    assert auth(proxy.port, "alice@one.example", "Alice-pass-123", "127.0.3.1") == 235
    page = web.get(PAGE).get_data(as_text=True)
    assert "Cleared the block of the username alice@one.example." in page
    assert 'data-subject="ip:127.0.3.1"' not in page
    assert 'data-subject="user:alice@one.example"' not in page
    assert 'data-subject="user:bob@two.example"' in page
    assert auth(proxy.port, "bob@two.example", "Bob-pass-1234", "127.0.3.9") == 454
    event = data.query(lambda s: s.scalar(select(AuditEvent).where(
        AuditEvent.action == "clear_auth_block").order_by(AuditEvent.id)))
    assert event.actor == "root@example.net" and "127.0.3.1" in event.detail


def test_clearing_a_username_block_over_htmx_removes_its_row(web, users, proxy):
    fail_twice(proxy.port, "alice@one.example", "127.0.3.1")
    data.add_admin("root@example.net", "Root-pass-123")
    log_in(web, "root@example.net", "Root-pass-123")
    response = web.post(f"{PAGE}/clear", headers={"HX-Request": "true"},
                        data={"csrf_token": csrf_token(web, PAGE),
                              "subject": "user:alice@one.example"})
    assert response.status_code == 200 and response.get_data(as_text=True) == ""
    assert auth(proxy.port, "alice@one.example", "Alice-pass-123", "127.0.3.3") == 235
    assert auth(proxy.port, "alice@one.example", "Alice-pass-123", "127.0.3.1") == 454


def test_domain_admin_sees_only_usernames_of_their_domain(web, users, proxy):
    fail_twice(proxy.port, "alice@one.example", "127.0.3.1")
    fail_twice(proxy.port, "bob@two.example", "127.0.3.3")
    fail_twice(proxy.port, "nobody@one.example", "127.0.3.5")
    data.add_admin("ops@one.example", "Ops-pass-1234", domain="one.example")
    log_in(web, "ops@one.example", "Ops-pass-1234")
    page = web.get(PAGE).get_data(as_text=True)
    assert "alice@one.example" in page and "nobody@one.example" in page
    assert "bob@two.example" not in page
    assert "127.0.3." not in page  # client addresses belong to no domain

    token = csrf_token(web, PAGE)
    for subject in ("user:bob@two.example", "ip:127.0.3.1"):
        response = web.post(f"{PAGE}/clear", data={"csrf_token": token, "subject": subject})
        assert response.status_code == 404
    assert auth(proxy.port, "bob@two.example", "Bob-pass-1234", "127.0.3.9") == 454


def test_clearing_without_the_csrf_token_is_refused(web, users, proxy):
    fail_twice(proxy.port, "alice@one.example", "127.0.3.1")
    data.add_admin("root@example.net", "Root-pass-123")
    log_in(web, "root@example.net", "Root-pass-123")
    response = web.post(f"{PAGE}/clear", data={"subject": "ip:127.0.3.1"})
    assert response.status_code == 400
    assert auth(proxy.port, "alice@one.example", "Alice-pass-123", "127.0.3.1") == 454


def test_page_says_so_when_nothing_is_blocked(web, users):
    data.add_admin("root@example.net", "Root-pass-123")
    log_in(web, "root@example.net", "Root-pass-123")
    page = web.get(PAGE).get_data(as_text=True)
    assert "No logins are blocked." in page
    assert 'href="/outgoing/blocked-logins"' in page  # in the Outgoing menu


def rows(page: str) -> dict[str, str]:
    """Each block row's HTML by its subject."""
    found = {}
    for chunk in page.split('<tr id="block-')[1:]:
        subject = chunk.split('data-subject="', 1)[1].split('"', 1)[0]
        found[subject] = chunk.split("</tr>", 1)[0]
    return found


def test_each_row_says_which_logins_its_block_refuses(web, users, proxy):
    assert auth(proxy.port, "alice@one.example", "Alice-pass-123", "127.0.4.1") == 235
    fail_twice(proxy.port, "alice@one.example", "127.0.3.1")
    data.add_admin("root@example.net", "Root-pass-123")
    log_in(web, "root@example.net", "Root-pass-123")
    shown = rows(web.get(PAGE).get_data(as_text=True))
    address, username = shown["ip:127.0.3.1"], shown["user:alice@one.example"]
    assert "Client address" in address and "all logins from this address" in address
    assert "Username" in username
    assert "from networks it has not logged in from in the last 30 days" in username
    assert "not applied to 127.0.4.0/24" in username
    # And so it is: alice still gets in from that network, not from another.
    assert auth(proxy.port, "alice@one.example", "Alice-pass-123", "127.0.4.2") == 235
    assert auth(proxy.port, "alice@one.example", "Alice-pass-123", "127.0.5.1") == 454


def test_domain_admins_see_the_networks_only_of_their_own_usernames(web, users, proxy):
    assert auth(proxy.port, "alice@one.example", "Alice-pass-123", "127.0.4.1") == 235
    fail_twice(proxy.port, "alice@one.example", "127.0.3.1")
    data.add_admin("ops@one.example", "Ops-pass-1234", domain="one.example")
    data.add_admin("ops@two.example", "Ops-pass-1234", domain="two.example")
    log_in(web, "ops@one.example", "Ops-pass-1234")
    shown = rows(web.get(PAGE).get_data(as_text=True))
    assert list(shown) == ["user:alice@one.example"]
    assert "not applied to 127.0.4.0/24" in shown["user:alice@one.example"]
    other = web.application.test_client()
    log_in(other, "ops@two.example", "Ops-pass-1234")
    page = other.get(PAGE).get_data(as_text=True)
    assert "alice@one.example" not in page and "127.0.4.0" not in page
    assert "No logins are blocked." in page
