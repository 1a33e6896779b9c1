"""Outgoing > Log Search in the panel: every filter, keyset paging, the full record, and the
domain scoping (a domain admin never sees another domain's rows nor the rows of nobody)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from outgoing import message_log
from outgoing.models import MessageLogEntry, OutgoingUser
from tests.support import data
from tests.support.web import log_in

ROOT_PW = "Root-pass-12345"
OPS_PW = "Ops-pass-12345"
T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def record(n: int, minutes: float, **fields) -> tuple[str, dict]:
    entry = {"at": (T0 + timedelta(minutes=minutes)).timestamp(), "stage": "relay",
             "verdict": "relayed", "reply": "250 2.0.0 Message accepted",
             "client_ip": "192.0.2.10", "recipients": ["bob@example.org"], "rcpt_count": 1}
    entry.update(fields)
    return f"{1700000000000 + n}-0", message_log.encode(entry)


def store(*records) -> None:
    data.query(lambda s: message_log.insert_rows(
        s, [message_log.row_from_entry(stream_id, fields) for stream_id, fields in records]))


@pytest.fixture
def logged(instance):
    """Two customers' transactions and one of nobody (refused before AUTH)."""
    alice = data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123")
    mallory = data.add_user("other.example", "user", "mallory@other.example", "Mal-pass-123")
    domains = data.query(lambda s: {u: s.get(OutgoingUser, u).domain_id
                                    for u in (alice, mallory)})
    own = {"user_id": alice, "domain_id": domains[alice], "user_name": "alice@example.com"}
    other = {"user_id": mallory, "domain_id": domains[mallory],
             "user_name": "mallory@other.example"}
    store(
        record(1, 0, mail_from="alice@example.com", subject="Quarterly figures for you",
               message_id="<q1@example.com>", identity="alice@example.com",
               queue_id="3F2A9C01B7", **own),
        record(2, 10, mail_from="news@example.com", subject="Newsletter", verdict="quarantined",
               stage="content", recipients=["carol@example.org", "dave@example.org"],
               rcpt_count=2, identity="news@example.com", stored_kind="quarantine",
               stored_id=7, rules=["GTUBE"], score=1000.0, **own),
        record(3, 20, mail_from="mallory@other.example", subject="Quarterly secrets",
               message_id="<m1@other.example>", queue_id="0D0E0F0A0B", **other),
        record(4, 30, stage="auth", verdict="refused", login="alice@example.com",
               reply="535 5.7.8 Authentication credentials invalid"),
        record(5, 24 * 60, mail_from="alice@example.com", subject="Next day", **own),
    )
    data.add_admin("root@example.net", ROOT_PW)
    data.add_admin("ops@example.com", OPS_PW, domain="example.com")
    return own


def ids_on(client, **args) -> list[int]:
    html = client.get("/outgoing/log", query_string=args).get_data(as_text=True)
    return [int(n) for n in re.findall(r'id="log-(\d+)"', html)]


def entry_ids() -> dict[str, int]:
    return data.query(lambda s: {row.stream_id: row.id for row in s.scalars(
        select(MessageLogEntry))})


def by_n(*ns) -> list[int]:
    ids = entry_ids()
    return [ids[f"{1700000000000 + n}-0"] for n in ns]


def test_super_admin_finds_transactions_by_every_filter(app, logged):
    client = app.test_client()
    log_in(client, "root@example.net", ROOT_PW)
    assert ids_on(client) == by_n(5, 4, 3, 2, 1)  # newest first
    assert ids_on(client, sender="alice@example.com") == by_n(5, 1)
    assert ids_on(client, recipient="dave@example.org") == by_n(2)
    assert ids_on(client, recipient="ave@example.org") == []  # whole addresses only
    assert ids_on(client, message_id="q1@example.com") == by_n(1)
    # The queue id of our Received: field, as a customer quotes it from the headers.
    assert ids_on(client, queue_id="3F2A9C01B7") == by_n(1)
    assert ids_on(client, queue_id=" 3f2a9c01b7") == by_n(1)
    assert ids_on(client, queue_id="0d0e0f0a0b") == by_n(3)
    assert ids_on(client, queue_id="3F2A9C01B8") == []
    for hostile in ("%", "3F2A9C01B_", "3F2A9C01B7\r\nX: y", "Z" * 5000):  # nothing, no 500
        response = client.get("/outgoing/log", query_string={"queue_id": hostile})
        assert response.status_code == 200 and ids_on(client, queue_id=hostile) == []
    nul = client.get("/outgoing/log", query_string={"queue_id": "3F2A9C01B7\x00"})
    assert nul.status_code == 400 and "NUL" in nul.get_data(as_text=True)
    assert ids_on(client, subject="quarterly") == by_n(3, 1)
    assert ids_on(client, subject="quarterly figures") == by_n(1)
    assert ids_on(client, verdict="quarantined") == by_n(2)
    assert ids_on(client, user="alice@example.com") == by_n(5, 2, 1)
    assert ids_on(client, identity="news@example.com") == by_n(2)
    assert ids_on(client, **{"from": "2026-11-20T12:05", "to": "2026-11-20T12:25"}) == \
        by_n(3, 2)
    assert ids_on(client, to="2026-11-20") == by_n(4, 3, 2, 1)  # a date: the whole day
    # A minute: the whole minute, as the list shows it (12:20:30 is listed at 12:20).
    store(record(6, 20.5, mail_from="late@example.com"))
    assert ids_on(client, **{"from": "2026-11-20T12:20", "to": "2026-11-20T12:20"}) == \
        by_n(6, 3)
    assert ids_on(client, **{"from": "2026-11-20T12:20", "to": "2026-11-20T12:20:15"}) == \
        by_n(3)
    html = client.get("/outgoing/log?from=yesterday").get_data(as_text=True)
    assert "yesterday is not a time" in html


def test_pages_follow_the_index_order_with_a_cursor(app, logged, monkeypatch):
    from webapp import message_log as page

    monkeypatch.setattr(page, "PAGE_SIZE", 2)
    client = app.test_client()
    log_in(client, "root@example.net", ROOT_PW)
    first = client.get("/outgoing/log").get_data(as_text=True)
    assert [int(n) for n in re.findall(r'id="log-(\d+)"', first)] == by_n(5, 4)
    following = re.search(r'href="(/outgoing/log\?after=[^"]+)"', first).group(1)
    second = client.get(following.replace("&amp;", "&")).get_data(as_text=True)
    assert [int(n) for n in re.findall(r'id="log-(\d+)"', second)] == by_n(3, 2)
    third = re.search(r'href="(/outgoing/log\?after=[^"]+)"', second).group(1)
    assert ids_on(client, after=third.split("after=")[1].replace("%3A", ":")) == by_n(1)


def test_the_full_record_links_to_the_stored_message(app, logged):
    client = app.test_client()
    log_in(client, "root@example.net", ROOT_PW)
    (quarantined,) = by_n(2)
    html = client.get(f"/outgoing/log/{quarantined}").get_data(as_text=True)
    assert "Quarantined" in html and "carol@example.org, dave@example.org" in html
    assert "GTUBE" in html and "192.0.2.10" in html
    assert 'href="/outgoing/quarantine/7"' in html


def test_domain_admin_sees_only_their_domain_and_never_the_unauthenticated(app, logged):
    client = app.test_client()
    log_in(client, "ops@example.com", OPS_PW)
    assert ids_on(client) == by_n(5, 2, 1)
    assert ids_on(client, subject="quarterly") == by_n(1)
    assert ids_on(client, sender="mallory@other.example") == []
    assert ids_on(client, user="mallory@other.example") == []
    assert ids_on(client, queue_id="0D0E0F0A0B") == []  # another domain's queue id
    assert ids_on(client, verdict="refused") == []
    mallory, nobody = by_n(3, 4)
    assert client.get(f"/outgoing/log/{mallory}").status_code == 404
    assert client.get(f"/outgoing/log/{nobody}").status_code == 404
    assert client.get(f"/outgoing/log/{by_n(1)[0]}").status_code == 200


def test_the_htmx_search_answers_with_the_rows_only(app, logged):
    client = app.test_client()
    log_in(client, "root@example.net", ROOT_PW)
    response = client.get("/outgoing/log?sender=alice@example.com",
                          headers={"HX-Request": "true", "HX-Target": "log-rows"})
    body = response.get_data(as_text=True)
    assert "<html" not in body and body.count('id="log-') == 2


def test_held_and_throttled_are_verdicts_to_search_by(app, logged):
    store(record(6, 40, verdict="held", stage="content", identity="alice@example.com",
                 mail_from="alice@example.com", **logged),
          record(7, 41, verdict="throttled", stage="content", identity="alice@example.com",
                 mail_from="alice@example.com", reply="451 4.7.1 Slow down", **logged))
    client = app.test_client()
    log_in(client, "ops@example.com", OPS_PW)
    html = client.get("/outgoing/log").get_data(as_text=True)
    assert '<option value="held">Held</option>' in html
    assert '<option value="throttled">Throttled</option>' in html
    assert ids_on(client, verdict="held") == by_n(6)
    assert ids_on(client, verdict="throttled") == by_n(7)
