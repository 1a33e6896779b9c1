"""Outgoing > Manage Identities: the list, adding one by hand, lock / unlock / reset."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.engine import Engine

from outgoing.models import AuditEvent, Identity
from tests.integration.test_panel_users import ROOT, ROOT_PW, Panel, text
from tests.support import data


@pytest.fixture
def root(app):
    data.add_admin(ROOT, ROOT_PW)
    return Panel(app.test_client()).login(ROOT, ROOT_PW)


@pytest.fixture
def bob(root):
    return data.add_user("example.com", "user", "bob@example.com", "Bob-pass-12345")


def identity_id(value: str) -> int:
    return data.query(lambda s: s.scalar(select(Identity.id).where(Identity.value == value)))


def test_an_identity_added_by_hand_is_listed_with_every_column(root, bob):
    response = root.post("/outgoing/identities", {"user": "BOB@example.com",
                                                  "value": "shop-42"})
    assert response.status_code == 302
    assert response.headers["Location"] == f"/outgoing/identities?user={bob}"
    html = text(root.get(response.headers["Location"]))
    headers = re.findall(r'<th scope="col">([^<]+)</th>', html)
    assert headers == ["Domain", "User", "Identity", "Lock time", "Reason", "Locked",
                       "Automatic unlocks"]
    row = re.search(rf'<tr id="identity-{identity_id("shop-42")}".*?</tr>', html, re.S).group(0)
    for cell in ("example.com", "bob@example.com", "shop-42", "Unlocked", "0 / 3"):
        assert cell in row
    assert data.query(lambda s: s.scalar(select(AuditEvent.action).where(
        AuditEvent.target_type == "identity"))) == "create"


@pytest.mark.parametrize("user, value, message", [
    ("nobody@example.com", "x", "No outgoing user is called nobody@example.com."),
    ("bob@example.com", "", "Enter the identity"),
    ("bob@example.com", "two\x01lines", "An identity is one line of printable text."),
])
def test_adding_an_identity_explains_what_is_wrong(root, bob, user, value, message):
    response = root.post("/outgoing/identities", {"user": user, "value": value}, htmx=True)
    assert response.status_code == 400
    body = text(response)
    assert body.lstrip().startswith('<section class="card" id="add-identity"')
    assert message in body


def test_the_same_identity_is_added_once_per_user(root, bob):
    root.post("/outgoing/identities", {"user": "bob@example.com", "value": "shop-42"})
    response = root.post("/outgoing/identities", {"user": "bob@example.com", "value": "shop-42"})
    assert response.status_code == 400
    assert "already has the identity shop-42" in text(response)


def test_an_address_added_by_hand_is_stored_as_the_proxy_spells_it(root, bob):
    """A quoted dot-string is the plain address (the proxy's lock key), not another one."""
    root.post("/outgoing/identities", {"user": "bob@example.com",
                                       "value": '"Lock\\ed"@example.com'})
    assert identity_id("locked@example.com") is not None


def test_identities_lock_unlock_and_reset_in_place(root, bob, redis_client):
    root.post("/outgoing/identities", {"user": "bob@example.com", "value": "Shop-42"})
    ident = identity_id("shop-42")
    row = text(root.post(f"/outgoing/identities/{ident}/lock", {"reason": "spam run"},
                         htmx=True))
    assert row.lstrip().startswith(f'<tr id="identity-{ident}"')
    assert "Manual" in row and "spam run" in row
    assert redis_client.exists(f"og:{{{bob}}}:idlock:shop-42")
    data.query(lambda s: setattr(s.get(Identity, ident), "automatic_unlocks_used", 2))
    assert "0 / 3" in text(root.post(f"/outgoing/identities/{ident}/reset", htmx=True))
    row = text(root.post(f"/outgoing/identities/{ident}/unlock", htmx=True))
    assert "Unlocked" in row and not redis_client.exists(f"og:{{{bob}}}:idlock:shop-42")


def test_identity_lock_asks_for_the_reason_in_the_row(root, bob, redis_client):
    root.post("/outgoing/identities", {"user": "bob@example.com", "value": "shop-7"})
    ident = identity_id("shop-7")
    assert "hx-prompt" not in text(root.get("/outgoing/identities"))
    asking = text(root.get(f"/outgoing/identities/{ident}/lock", htmx=True))
    assert asking.lstrip().startswith(f'<tr id="identity-{ident}"')
    assert "Lock reason" in asking and 'name="csrf_token"' in asking
    assert f'hx-get="/outgoing/identities/{ident}/row"' in asking
    assert 'name="reason"' not in text(root.get(f"/outgoing/identities/{ident}/row",
                                                htmx=True))
    page = text(root.get(f"/outgoing/identities/{ident}/lock"))  # without JavaScript
    assert "<h1>Lock shop-7</h1>" in page
    response = root.post(f"/outgoing/identities/{ident}/lock",
                         {"reason": "hacked shop", "next": f"/outgoing/identities?user={bob}"})
    assert response.status_code == 302
    assert response.location.endswith(f"/outgoing/identities?user={bob}")
    assert data.query(lambda s: s.get(Identity, ident).lock_reason) == "hacked shop"
    assert redis_client.exists(f"og:{{{bob}}}:idlock:shop-7")


def test_identities_are_searched_by_prefix_and_filtered_by_user(root, bob):
    carol = data.add_user("example.com", "user", "carol@example.com", "Carol-pass-1234")
    for user, value in [("bob@example.com", "alpha@x.example"),
                        ("bob@example.com", "beta@x.example"),
                        ("carol@example.com", "alpha2@y.example")]:
        root.post("/outgoing/identities", {"user": user, "value": value})

    def values(url):
        return re.findall(r'<td class="strong">(?:<a [^>]*>)?([^<]+)(?:</a>)?</td>',
                          text(root.get(url)))
    assert values("/outgoing/identities?q=alpha") == ["alpha2@y.example", "alpha@x.example"]
    assert values(f"/outgoing/identities?user={carol}") == ["alpha2@y.example"]
    assert values(f"/outgoing/identities?user={bob}&q=b") == ["beta@x.example"]


def test_an_identity_too_long_once_its_domain_is_spelled_as_dns_does_is_a_form_error(root, bob):
    """The length is checked on the A-label spelling that is stored: 240 characters in
    Unicode are 275 as xn--..., more than the column holds (PostgreSQL refused it: a 500)."""
    domain = ".".join(["bücher" * 5] * 5) + ".test"
    value = "s" * (240 - len(domain) - 1) + "@" + domain
    assert len(value) == 240
    response = root.post("/outgoing/identities", {"user": "bob@example.com", "value": value},
                         htmx=True)
    assert response.status_code == 400
    body = text(response)
    assert body.lstrip().startswith('<section class="card" id="add-identity"')
    assert "An identity is at most 255 characters" in body
    assert "this one is 275" in body
    assert value in body  # the form shows back what was typed
    assert data.query(lambda s: s.scalar(select(Identity.id))) is None


def test_an_identity_longer_than_the_column_is_a_form_error(root, bob):
    response = root.post("/outgoing/identities", {"user": "bob@example.com",
                                                  "value": "c" * 256}, htmx=True)
    assert response.status_code == 400
    assert "An identity is at most 255 characters" in text(response)
    response = root.post("/outgoing/identities", {"user": "bob@example.com",
                                                  "value": "c" * 255})
    assert response.status_code == 302


def test_an_identity_added_by_hand_is_keyed_as_the_proxy_keys_it(root, bob):
    """The proxy lower-cases the whole identity (its Redis key and its row), so capitals
    typed in the panel named the same sender as a second row the proxy never counted."""
    response = root.post("/outgoing/identities", {"user": "bob@example.com",
                                                  "value": "Alice@Example.TEST"})
    assert response.status_code == 302
    assert data.query(lambda s: list(s.scalars(select(Identity.value)))) == [
        "alice@example.test"]
    for again in ("alice@example.test", "ALICE@EXAMPLE.TEST", '"Alice"@example.test'):
        response = root.post("/outgoing/identities", {"user": "bob@example.com",
                                                      "value": again}, htmx=True)
        assert response.status_code == 400
        assert "already has the identity alice@example.test" in text(response)
    assert data.query(lambda s: s.scalar(select(func.count(Identity.id)))) == 1


def test_a_capitalised_identity_added_by_hand_is_the_row_the_proxy_counts(root, bob):
    """The proxy's counts for the sender land on the row the admin added, not a second one."""
    from datetime import datetime

    from outgoing.identities import record_counts

    root.post("/outgoing/identities", {"user": "bob@example.com", "value": "Shop@Bücher.TEST"})
    data.query(lambda s: record_counts(s, bob, {"shop@BÜCHER.test": (3, 1)}, datetime(2026, 1, 1)))
    rows = data.query(lambda s: s.execute(select(
        Identity.value, Identity.message_count, Identity.spam_count)).all())
    assert [tuple(row) for row in rows] == [("shop@xn--bcher-kva.test", 3, 1)]


def test_a_row_added_with_capitals_before_counts_as_the_same_identity(root, bob):
    data.query(lambda s: s.add(Identity(user_id=bob, value="Alice@Example.TEST")))
    response = root.post("/outgoing/identities", {"user": "bob@example.com",
                                                  "value": "alice@example.test"}, htmx=True)
    assert response.status_code == 400
    assert "already has the identity Alice@Example.TEST" in text(response)


def test_an_identity_added_twice_at_once_is_added_once_and_the_second_is_told(root, bob):
    """The second of two identical adds passes the duplicate check before the first commits;
    the unique key then refuses its insert. Simulated exactly: the other add commits through
    its own connection just before this request's INSERT."""
    raced = []

    def other_add_first(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO IDENTITIES") and not raced:
            raced.append("racing")  # the other add's own INSERT passes through here too
            raced.append(data.add_identity(bob, "shop-42"))

    event.listen(Engine, "before_cursor_execute", other_add_first)
    try:
        response = root.post("/outgoing/identities", {"user": "bob@example.com",
                                                      "value": "shop-42"}, htmx=True)
    finally:
        event.remove(Engine, "before_cursor_execute", other_add_first)
    assert len(raced) == 2
    assert response.status_code == 409
    assert "same change was being made at the same moment" in text(response)
    assert data.query(lambda s: s.scalar(select(func.count()).select_from(Identity))) == 1
    # the panel's session is usable again: the next page works
    assert root.get(f"/outgoing/identities?user={bob}").status_code == 200


def test_only_a_duplicate_row_is_a_change_made_meanwhile(instance):
    """The 409 is for a duplicate row only; a missing value or a broken reference is a
    fault of the code and stays a 500 with its traceback."""
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    from webapp import _unique_violation

    bob = data.add_user("example.com", "user", "bob@example.com", "Bob-pass-12345")
    data.add_identity(bob, "shop-42")
    with pytest.raises(IntegrityError) as duplicate:
        data.add_identity(bob, "shop-42")
    with pytest.raises(IntegrityError) as missing:
        data.query(lambda s: s.execute(insert(Identity).values(user_id=bob, value=None)))
    assert _unique_violation(duplicate.value)
    assert not _unique_violation(missing.value)
