"""Message archiving for senders: copies of relayed mail under the envelope sender's domain,
searched and downloaded in the control panel."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from outgoing.models import ArchivedMessage, Domain
from outgoing.users import get_or_create_domain
from tests.support import data
from tests.support.mail import client, message, send
from tests.support.web import log_in

PASSWORD = "Alice-pass-123"


def archived():
    return data.query(lambda s: [(a.id, a.mail_from, a.subject, s.get(Domain, a.domain_id).name)
                                 for a in s.scalars(select(ArchivedMessage)
                                                    .order_by(ArchivedMessage.id))])


@pytest.fixture
def relayed(instance, start_proxy, sink):
    """Three messages relayed through the proxy by an archiving user, one unarchived."""
    data.add_user("example.com", "user", "alice@example.com", PASSWORD, message_archiving=True)
    data.add_user("example.com", "user", "quiet@example.com", PASSWORD)
    data.add_user("shop.example.net", "user", "owner@shop.example.net", PASSWORD,
                  message_archiving=True)
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert send(smtp, message(subject="Quarterly numbers"), rcpts=("bob@example.org",))[0] \
            == 250
        assert send(smtp, message(subject="Lunch?"), rcpts=("carol@example.org",))[0] == 250
        # Another customer's domain as the envelope sender: still alice's copy.
        assert send(smtp, message(sender="sales@shop.example.net", subject="Sent as the shop"),
                    sender="sales@shop.example.net", rcpts=("dave@example.org",))[0] == 250
    with client(proxy.port) as smtp:
        smtp.login("owner@shop.example.net", PASSWORD)
        assert send(smtp, message(sender="owner@shop.example.net", subject="Shop offer"),
                    sender="owner@shop.example.net", rcpts=("erin@example.org",))[0] == 250
    with client(proxy.port) as smtp:
        smtp.login("quiet@example.com", PASSWORD)
        assert send(smtp, message(sender="quiet@example.com", subject="Not archived"),
                    sender="quiet@example.com")[0] == 250
    return sink


def test_relayed_messages_are_archived_under_the_sending_users_domain(relayed):
    """Even with another customer's domain as the envelope sender: that customer must not
    get (or see) alice's mail in its archive (tests/security/test_tenancy_smtp.py)."""
    assert [(mail_from, subject, domain) for _, mail_from, subject, domain in archived()] == [
        ("alice@example.com", "Quarterly numbers", "example.com"),
        ("alice@example.com", "Lunch?", "example.com"),
        ("sales@shop.example.net", "Sent as the shop", "example.com"),
        ("owner@shop.example.net", "Shop offer", "shop.example.net"),
    ]


def test_message_refused_by_the_next_hop_is_not_archived(instance, start_proxy, sink):
    data.add_user("example.com", "user", "alice@example.com", PASSWORD, message_archiving=True)
    sink.handler.refuse_with = "554 5.7.1 no"
    with client(start_proxy().port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert send(smtp, message())[0] == 554
    assert archived() == []


@pytest.fixture
def web(app):
    return app.test_client()


@pytest.fixture
def admin(web, relayed):
    data.add_admin("ops@example.com", "Ops-pass-12345", domain="example.com")
    assert log_in(web, "ops@example.com", "Ops-pass-12345").status_code == 302
    return web


def listed(web, query="") -> str:
    return web.get(f"/outgoing/archive{query}").get_data(as_text=True)


def test_domain_admin_sees_only_their_domains_archive(admin):
    page = listed(admin)
    assert "Quarterly numbers" in page and "Lunch?" in page and "Sent as the shop" in page
    assert "Shop offer" not in page and "Not archived" not in page


@pytest.mark.parametrize("query,expected", [
    ("?sender=ALICE@", {"Quarterly numbers", "Lunch?"}),
    ("?recipient=carol", {"Lunch?"}),
    ("?subject=quarterly", {"Quarterly numbers"}),
    ("?subject=nothing-like-it", set()),
])
def test_search_by_sender_recipient_and_subject(admin, query, expected):
    page = listed(admin, query)
    assert {s for s in ("Quarterly numbers", "Lunch?") if s in page} == expected


def test_search_by_date(admin):
    today = datetime.now(UTC).date()
    yesterday = today - timedelta(days=1)
    assert "Lunch?" in listed(admin, f"?from={today}&to={today}")
    assert "Lunch?" not in listed(admin, f"?to={yesterday}")
    assert "Lunch?" not in listed(admin, f"?from={today + timedelta(days=1)}")
    assert "is not a date" in listed(admin, "?from=tomorrow")


@pytest.fixture
def crowded(web, instance):
    """51 archived messages: one more than a page."""
    def archive(session):
        domain = get_or_create_domain(session, "example.com")
        session.flush()
        session.add_all(ArchivedMessage(domain_id=domain.id, mail_from="alice@example.com",
                                        rcpt_tos='["bob@example.org"]', subject=f"Note {n}",
                                        size=1, storage_key=f"none/{n}") for n in range(51))
    data.query(archive)
    data.add_admin("ops@example.com", "Ops-pass-12345", domain="example.com")
    assert log_in(web, "ops@example.com", "Ops-pass-12345").status_code == 302
    return web


@pytest.mark.parametrize("extra", ["endpoint=x", "_method=POST", "utm_source=mail"])
def test_older_messages_passes_on_the_search_and_nothing_else(crowded, extra):
    """url_for took "endpoint" and "_method" in the query as its own: a 500."""
    page = listed(crowded, f"?subject=Note&{extra}")
    assert '<a href="/outgoing/archive?offset=50&amp;subject=Note">Older messages</a>' in page


def test_download_gives_the_message_as_relayed(admin, relayed):
    first = archived()[0][0]
    response = admin.get(f"/outgoing/archive/{first}/download")
    assert response.status_code == 200 and response.mimetype == "message/rfc822"
    assert 'filename="archived-' in response.headers["Content-Disposition"]
    assert response.data == relayed.handler.messages[0].data


def test_view_shows_the_message_as_text(admin):
    first = archived()[0][0]
    page = admin.get(f"/outgoing/archive/{first}").get_data(as_text=True)
    assert "Just saying hello." in page and "bob@example.org" in page


@pytest.mark.parametrize("suffix", ["", "/download"])
def test_another_domains_archived_message_is_a_404(admin, suffix):
    shop = next(a[0] for a in archived() if a[3] == "shop.example.net")
    assert admin.get(f"/outgoing/archive/{shop}{suffix}").status_code == 404
