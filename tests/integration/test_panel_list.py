"""The Outgoing Users list: search, keyset pages, one query per page, HTMX row actions."""

from __future__ import annotations

import json
import re

import pytest
from sqlalchemy import event, insert, select

from outgoing.models import AuditEvent, Domain, OutgoingUser
from tests.integration.test_panel_users import ROOT, ROOT_PW, Panel, text
from tests.support import data


@pytest.fixture
def root(app):
    data.add_admin(ROOT, ROOT_PW)
    return Panel(app.test_client()).login(ROOT, ROOT_PW)


def names_on(html: str) -> list[str]:
    return re.findall(r'<tr id="user-\d+" data-name="([^"]+)"', html)


def bulk_users(domain: str, count: int, prefix: str = "user") -> None:
    """Many users at once, the way the benchmark loads them."""
    def insert_rows(session):
        domain_id = session.scalar(select(Domain.id).where(Domain.name == domain))
        session.execute(insert(OutgoingUser), [
            {"domain_id": domain_id, "kind": "user", "name": f"{prefix}{i:04d}@{domain}"}
            for i in range(count)])
    data.add_user(domain, "domain", domain, "Domain-pass-123")
    data.query(insert_rows)


def test_pages_follow_each_other_by_name_without_gaps_or_repeats(root):
    bulk_users("example.com", 120)
    first = text(root.get("/outgoing/users"))
    assert "121 outgoing users" in first
    seen = names_on(first)
    assert len(seen) == 50
    html = first
    while (match := re.search(r'href="(/outgoing/users\?after=[^"]+)"', html)):
        html = text(root.get(match.group(1).replace("&amp;", "&")))
        seen += names_on(html)
    assert len(seen) == 121 and seen == sorted(seen)
    back = re.search(r'href="(/outgoing/users\?before=[^"]+)"', html).group(1)
    previous = names_on(text(root.get(back.replace("&amp;", "&"))))
    assert previous == seen[50:100]


def test_search_finds_names_domains_and_the_range_containing_an_address(root):
    bulk_users("example.com", 5)
    data.add_user("shop.example", "ip", "10.20.0.0/16")
    data.add_user("shop.example", "user", "zed@elsewhere.example", "Zed-pass-12345")
    assert names_on(text(root.get("/outgoing/users?q=USER0003"))) == [
        "user0003@example.com"]
    assert names_on(text(root.get("/outgoing/users?q=shop"))) == [
        "10.20.0.0/16", "zed@elsewhere.example"]
    assert names_on(text(root.get("/outgoing/users?q=10.20.7.9"))) == ["10.20.0.0/16"]
    assert "No outgoing users match" in text(root.get("/outgoing/users?q=nobody"))


def test_htmx_search_returns_only_the_list(root):
    bulk_users("example.com", 3)
    response = root.get("/outgoing/users?q=user0001", htmx=True, **{"HX-Target": "user-list"})
    body = text(response)
    assert body.lstrip().startswith('<div id="user-list">')
    assert names_on(body) == ["user0001@example.com"] and "Add a user" not in body


def test_the_number_of_queries_does_not_grow_with_the_rows_on_a_page(app, root):
    """No N+1: a row never queries for its domain or anything else."""
    bulk_users("example.com", 60)
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine

    def statements_for(url: str) -> tuple[int, int]:
        statements = []

        def count(conn, cursor, statement, *args):
            statements.append(statement)
        event.listen(engine, "before_cursor_execute", count)
        try:
            html = text(root.get(url))
        finally:
            event.remove(engine, "before_cursor_execute", count)
        return len(names_on(html)), len(statements)

    rows_small, queries_small = statements_for("/outgoing/users?q=user000")
    rows_full, queries_full = statements_for("/outgoing/users")
    assert (rows_small, rows_full) == (10, 50)
    assert queries_full <= queries_small + 1  # + the total count, shown when not searching
    assert queries_full <= 5


def test_lock_unlock_and_reset_are_htmx_row_actions_that_are_audited(root, redis_client):
    bob = data.add_user("example.com", "user", "bob@example.com", "Bob-pass-12345")
    data.query(lambda s: setattr(s.get(OutgoingUser, bob), "automatic_unlocks_used", 2))
    locked = root.post(f"/outgoing/users/{bob}/lock", {"reason": "phishing complaint"},
                       htmx=True)
    row = text(locked)
    assert row.lstrip().startswith(f'<tr id="user-{bob}"')
    assert "Manual" in row and "phishing complaint" in row and 'aria-label="Locked"' in row
    assert json.loads(redis_client.get(f"og:{{{bob}}}:lock"))["reason"] == "phishing complaint"
    reset = text(root.post(f"/outgoing/users/{bob}/reset", htmx=True))
    assert "0 / 3" in reset
    unlocked = text(root.post(f"/outgoing/users/{bob}/unlock", htmx=True))
    assert "Unlocked" in unlocked and not redis_client.exists(f"og:{{{bob}}}:lock")
    actions = data.query(lambda s: [(e.action, e.actor) for e in s.scalars(
        select(AuditEvent).order_by(AuditEvent.id))])
    assert actions == [("lock", ROOT), ("reset_unlocks", ROOT), ("unlock", ROOT)]


def test_row_actions_without_javascript_return_to_the_list(root):
    bob = data.add_user("example.com", "user", "bob@example.com", "Bob-pass-12345")
    response = root.post(f"/outgoing/users/{bob}/lock")
    assert response.status_code == 302
    assert "locked by root@example.net" in text(root.get("/outgoing/users"))


def test_lock_asks_for_the_reason_in_the_row_instead_of_a_prompt(root, redis_client):
    bob = data.add_user("example.com", "user", "bob@example.com", "Bob-pass-12345")
    listing = text(root.get("/outgoing/users"))
    assert "hx-prompt" not in listing
    assert f'hx-get="/outgoing/users/{bob}/lock"' in listing
    asking = text(root.get(f"/outgoing/users/{bob}/lock", htmx=True))
    assert asking.lstrip().startswith(f'<tr id="user-{bob}"')
    assert f'<label for="user-{bob}-reason">Lock reason</label>' in asking
    assert 'name="reason"' in asking and 'name="csrf_token"' in asking
    assert f'hx-post="/outgoing/users/{bob}/lock"' in asking
    assert f'hx-get="/outgoing/users/{bob}/row"' in asking  # Cancel
    assert not redis_client.exists(f"og:{{{bob}}}:lock")  # asking locks nothing
    cancelled = text(root.get(f"/outgoing/users/{bob}/row", htmx=True))
    assert 'name="reason"' not in cancelled and "Unlocked" in cancelled
    locked = text(root.post(f"/outgoing/users/{bob}/lock", {"reason": "spam complaint"},
                            htmx=True))
    assert "spam complaint" in locked and 'name="reason"' not in locked
    assert json.loads(redis_client.get(f"og:{{{bob}}}:lock"))["reason"] == "spam complaint"


def test_lock_with_a_reason_works_without_javascript(root, redis_client):
    bob = data.add_user("example.com", "user", "bob@example.com", "Bob-pass-12345")
    page = text(root.get(f"/outgoing/users/{bob}/lock"))
    assert "<h1>Lock bob@example.com</h1>" in page and 'name="reason"' in page
    assert f'action="/outgoing/users/{bob}/lock"' in page
    response = root.post(f"/outgoing/users/{bob}/lock",
                         {"reason": "stolen password", "next": "/outgoing/users"})
    assert response.status_code == 302 and response.location.endswith("/outgoing/users")
    assert json.loads(redis_client.get(f"og:{{{bob}}}:lock"))["reason"] == "stolen password"
    assert root.get(f"/outgoing/users/{bob}/row").status_code == 302


def test_a_domain_admin_cannot_open_the_lock_form_of_another_domains_user(app):
    data.add_admin("ops@one.example", "Ops-pass-12345", domain="one.example")
    other = data.add_user("two.example", "user", "bob@two.example", "Bob-pass-12345")
    ops = Panel(app.test_client()).login("ops@one.example", "Ops-pass-12345")
    for htmx in (False, True):
        assert ops.get(f"/outgoing/users/{other}/lock", htmx=htmx).status_code == 404
        assert ops.get(f"/outgoing/users/{other}/row", htmx=htmx).status_code == 404


def test_a_row_action_without_the_csrf_token_changes_nothing(root, redis_client):
    bob = data.add_user("example.com", "user", "bob@example.com", "Bob-pass-12345")
    root.client.post(f"/outgoing/users/{bob}/lock", headers={"HX-Request": "true"})
    assert not redis_client.exists(f"og:{{{bob}}}:lock")
    assert data.query(lambda s: s.get(OutgoingUser, bob).locked) is False
