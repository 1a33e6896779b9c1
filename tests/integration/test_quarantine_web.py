"""Outgoing > Quarantine in the control panel: list, safe view, Release, Remove, bulk actions,
domain scoping."""

from __future__ import annotations

import email.policy
import re
from email.message import EmailMessage

import pytest
from rq import Queue
from sqlalchemy import select

from outgoing.config import load_config
from outgoing.db import make_sessionmaker, session_scope
from outgoing.models import AuditEvent, QuarantinedMessage
from outgoing.quarantine import quarantine_message
from outgoing.storage import read_body, store_for
from outgoing.users import get_or_create_domain
from tests.support import data
from tests.support.mail import GTUBE, message
from tests.support.services import process_env, run_worker_burst
from tests.support.web import csrf_token, log_in

RELEASE_JOB = "worker.quarantine_jobs.release_quarantined"


def hold(domain: str, raw: bytes, *, sender: str, subject: str, identity="alice") -> int:
    config = load_config()
    factory = make_sessionmaker(config["DATABASE_URL"])
    with session_scope(factory) as db:
        dom = get_or_create_domain(db, domain)
        row = quarantine_message(db, store_for(config), domain_id=dom.id, user_id=None,
                                 mail_from=sender, rcpt_tos=["bob@example.org", "eve@example.net"],
                                 data=raw, subject=subject, identity=identity,
                                 client_ip="192.0.2.7", reason="spam (builtin): GTUBE",
                                 score=1000.0, rules=["GTUBE", "MISSING_DATE"])
        row_id = row.id
    factory.kw["bind"].dispose()
    return row_id


def html_message() -> bytes:
    msg = EmailMessage()
    msg["From"] = "alice@example.com"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "Look at this"
    msg.set_content("Plain words " + GTUBE)
    msg.add_alternative('<p>Hi</p><script>alert("owned")</script><img src="http://x.test/t.gif">',
                        subtype="html")
    return msg.as_bytes(policy=email.policy.SMTP)


@pytest.fixture
def web(app):
    return app.test_client()


@pytest.fixture
def messages(instance):
    return {"ours": hold("example.com", html_message(), sender="alice@example.com",
                         subject="Look at this"),
            "theirs": hold("other.org", message(sender="mallory@other.org", body=GTUBE),
                           sender="mallory@other.org", subject="Other domain's")}


@pytest.fixture
def domain_admin(web, messages):
    data.add_admin("ops@example.com", "Ops-pass-12345", domain="example.com")
    assert log_in(web, "ops@example.com", "Ops-pass-12345").status_code == 302
    return web


@pytest.fixture
def super_admin(web, messages):
    data.add_admin("root@example.net", "Root-pass-12345")
    assert log_in(web, "root@example.net", "Root-pass-12345").status_code == 302
    return web


def rows() -> dict[int, QuarantinedMessage]:
    return data.query(lambda s: {r.id: r for r in s.scalars(select(QuarantinedMessage))})


def test_list_shows_reason_score_rules_sender_identity_recipients_subject_and_time(
        domain_admin, messages):
    page = domain_admin.get("/outgoing/quarantine").get_data(as_text=True)
    row = re.search(rf'<tr id="quarantined-{messages["ours"]}">(.*?)</tr>', page, re.S).group(1)
    for text in ("alice@example.com", "alice", "bob@example.org, eve@example.net",
                 "Look at this", "spam (builtin): GTUBE", "1000.0", "GTUBE, MISSING_DATE",
                 "UTC", "Held"):
        assert text in row
    assert "Other domain&#39;s" not in page and "mallory@other.org" not in page


def test_super_admin_sees_every_domain(super_admin, messages):
    page = super_admin.get("/outgoing/quarantine").get_data(as_text=True)
    assert "Look at this" in page and "mallory@other.org" in page


def test_search_narrows_the_list(super_admin, messages):
    page = super_admin.get("/outgoing/quarantine?q=mallory").get_data(as_text=True)
    assert "mallory@other.org" in page and "Look at this" not in page


def test_view_shows_headers_and_text_but_never_renders_the_html(domain_admin, messages):
    response = domain_admin.get(f"/outgoing/quarantine/{messages['ours']}")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "Subject</th><td>Look at this" in page
    assert "Plain words" in page
    assert "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;" in page
    assert '<script>alert("owned")' not in page and '<img src="http://x.test' not in page
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]


def test_download_gives_the_stored_message(domain_admin, messages):
    response = domain_admin.get(f"/outgoing/quarantine/{messages['ours']}/download")
    assert response.status_code == 200
    assert response.mimetype == "message/rfc822"
    stored = data.query(lambda s: read_body(load_config(),
                                            s.get(QuarantinedMessage, messages["ours"])))
    assert response.data == stored and b"Subject: Look at this" in stored


@pytest.mark.parametrize("method,suffix", [("get", ""), ("get", "/download"),
                                           ("post", "/release"), ("post", "/remove")])
def test_another_domains_message_is_a_404_for_a_domain_admin(domain_admin, messages, method,
                                                             suffix):
    url = f"/outgoing/quarantine/{messages['theirs']}{suffix}"
    kwargs = {}
    if method == "post":
        kwargs["data"] = {"csrf_token": csrf_token(domain_admin, "/outgoing/quarantine")}
    assert getattr(domain_admin, method)(url, **kwargs).status_code == 404
    assert messages["theirs"] in rows()


def test_remove_deletes_the_message_and_its_body(domain_admin, messages, instance):
    key = rows()[messages["ours"]].storage_key
    token = csrf_token(domain_admin, "/outgoing/quarantine")
    response = domain_admin.post(f"/outgoing/quarantine/{messages['ours']}/remove",
                                 data={"csrf_token": token})
    assert response.status_code == 302
    assert messages["ours"] not in rows()
    assert not (instance / "storage" / key).exists()
    audit = data.query(lambda s: [(e.action, e.actor) for e in s.scalars(select(AuditEvent))])
    assert ("remove", "ops@example.com") in audit


def test_release_queues_the_worker_job_which_relays_and_marks_it_released(
        domain_admin, messages, redis_client, sink):
    token = csrf_token(domain_admin, "/outgoing/quarantine")
    response = domain_admin.post(f"/outgoing/quarantine/{messages['ours']}/release",
                                 data={"csrf_token": token}, follow_redirects=True)
    assert "Release of 1 message(s) queued" in response.get_data(as_text=True)
    jobs = Queue("outgoing", connection=redis_client).jobs
    assert [(j.func_name, j.args) for j in jobs] == [(RELEASE_JOB, (messages["ours"],))]

    result = run_worker_burst(process_env(UPSTREAM_SMTP=f"127.0.0.1:{sink.port}"))
    assert result.returncode == 0, result.stderr[-2000:]
    [relayed] = sink.handler.wait_for(1)
    assert relayed.rcpt_tos == ["bob@example.org", "eve@example.net"]
    assert b"Subject: Look at this" in relayed.data
    assert rows()[messages["ours"]].released_at is not None
    page = domain_admin.get("/outgoing/quarantine").get_data(as_text=True)
    assert "Released" in page
    # Releasing again does nothing: the message went out once.
    run_worker_burst(process_env(UPSTREAM_SMTP=f"127.0.0.1:{sink.port}"))
    assert len(sink.handler.messages) == 1


def test_bulk_remove_touches_only_the_admins_own_messages(domain_admin, messages):
    second = hold("example.com", message(body=GTUBE), sender="carol@example.com",
                  subject="Second")
    token = csrf_token(domain_admin, "/outgoing/quarantine")
    response = domain_admin.post("/outgoing/quarantine/bulk", data={
        "csrf_token": token, "action": "remove",
        "ids": [str(messages["ours"]), str(second), str(messages["theirs"])]})
    assert response.status_code == 302
    assert set(rows()) == {messages["theirs"]}


def test_bulk_release_queues_one_job_per_selected_message(super_admin, messages,
                                                          redis_client):
    token = csrf_token(super_admin, "/outgoing/quarantine")
    super_admin.post("/outgoing/quarantine/bulk", data={
        "csrf_token": token, "action": "release",
        "ids": [str(messages["ours"]), str(messages["theirs"])]})
    jobs = Queue("outgoing", connection=redis_client).jobs
    assert sorted(j.args[0] for j in jobs if j.func_name == RELEASE_JOB) == sorted(
        messages.values())


def test_bulk_action_without_selection_says_so(domain_admin, messages):
    token = csrf_token(domain_admin, "/outgoing/quarantine")
    response = domain_admin.post("/outgoing/quarantine/bulk", data={
        "csrf_token": token, "action": "remove"}, follow_redirects=True)
    assert "Select at least one message." in response.get_data(as_text=True)
    assert len(rows()) == 2


def test_quarantine_is_in_the_outgoing_menu(domain_admin):
    page = domain_admin.get("/outgoing/quarantine").get_data(as_text=True)
    assert '<a href="/outgoing/quarantine">Quarantine</a>' in page
    assert '<a href="/outgoing/archive">Archive</a>' in page
