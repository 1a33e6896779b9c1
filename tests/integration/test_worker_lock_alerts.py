"""A lock makes the real worker mail the sender and the domain; the alert's link unlocks once.

Real Redis, a real ``rq worker --burst --with-scheduler`` process, the aiosmtpd sink as next
hop, and the real web app (Flask's test client) behind the link.
"""

from __future__ import annotations

import email
import email.policy
import re
import subprocess
import time
from datetime import timedelta

import pytest
from rq import Queue
from rq.job import Job
from sqlalchemy import select

from outgoing import redis_keys
from outgoing.jobs import enqueue
from outgoing.models import AuditEvent, Identity, LockTemplate, OutgoingUser, utcnow
from outgoing.tokens import make_unlock_token
from tests.support import data, worker
from tests.support.services import ROOT, Sink, procfile_worker
from tests.support.worker import LINK, PUBLIC_URL

ADMIN, ADMIN_PW = "ops@example.com", "Ops-pass-123"


@pytest.fixture
def alice(instance, redis_client):
    user_id = data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123",
                            lock_timeout_minutes=30, maximum_unlocks_by_timeout=3)
    worker.set_domain("example.com", abuse_report_address="postmaster@example.com")
    return user_id


def parsed(received):
    return email.message_from_bytes(received.data, policy=email.policy.default)


def mail_to(sink, address):
    found = [parsed(m) for m in sink.handler.messages if m.rcpt_tos == [address]]
    assert len(found) == 1, [m.rcpt_tos for m in sink.handler.messages]
    return found[0]


def token_of(alert) -> str:
    return LINK.search(alert.get_content()).group(1)


def csrf_from(html: str) -> str:
    return re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', html).group(1)


def log_in(client, email_addr=ADMIN, password=ADMIN_PW):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    response = client.post("/login", data={"email": email_addr, "password": password,
                                           "csrf_token": token})
    assert response.status_code == 302


def locked_and_alerted(sink, alice) -> str:
    """Lock alice, run the worker, return the unlock token of the alert."""
    worker.lock("user", alice)
    worker.burst(sink)
    return token_of(mail_to(sink, "postmaster@example.com"))


def confirm(client, token):
    page = client.get(f"/unlock/{token}")
    return client.post(f"/unlock/{token}",
                       data={"csrf_token": csrf_from(page.get_data(as_text=True))})


def test_lock_mails_rendered_template_to_sender_and_alert_with_link_to_domain(alice, sink):
    def use_template(session):
        template = LockTemplate(
            name="firm", subject="Paused: {{ user }}",
            body="Dear {{ user }}, we stopped your mail because {{ reason }}. "
                 "Back at {{ unlock_time }} ({{ automatic_unlocks_used }}/{{ max_unlocks }}).\n")
        session.get(OutgoingUser, alice).lock_template = template
    data.query(use_template)
    locked_at = utcnow()
    for n, rcpt in enumerate(("victim1@example.org", "victim2@example.net")):
        worker.add_spam("example.com", alice, subject=f"Cheap pills {n}", rcpts=(rcpt,),
                        received_at=locked_at - timedelta(minutes=2 - n))
    worker.add_spam("example.com", alice, subject="Old news",
                    received_at=locked_at - timedelta(days=2))

    worker.lock("user", alice)
    worker.burst(sink)

    assert len(sink.handler.messages) == 2
    notice = mail_to(sink, "alice@example.com")
    assert notice["Subject"] == "Paused: alice@example.com"
    body = notice.get_content()
    assert "because 5 spam messages in 10 minutes" in body
    assert "(0/3)" in body and "UTC" in body

    alert = mail_to(sink, "postmaster@example.com")
    text = alert.get_content()
    assert alert["Subject"] == "[Outbound Guard] Locked: Authenticating User alice@example.com"
    assert "Why:    5 spam messages in 10 minutes" in text
    assert "Since:  " in text and "when the lock timeout expires" in text
    assert "Automatic unlocks used: 0 of 3" in text
    assert "Subject: Cheap pills 0" in text and "To: victim1@example.org" in text
    assert "Subject: Cheap pills 1" in text and "To: victim2@example.net" in text
    assert "Old news" not in text
    assert f"{PUBLIC_URL}/unlock/" in text


def test_running_the_worker_again_sends_nothing_twice(alice, sink):
    lock_id = worker.lock("user", alice)
    worker.burst(sink)
    enqueue(worker.redis_client(), "worker.jobs.notify_lock", "user", alice, lock_id)
    worker.burst(sink)
    assert len(sink.handler.messages) == 2


def test_refused_alert_is_retried_and_arrives_once_the_next_hop_takes_it(alice, sink,
                                                                         redis_client):
    worker.lock("user", alice)
    sink.handler.refuse_with = "451 4.3.0 try again later"
    worker.burst(sink)
    assert sink.handler.messages == []
    registry = Queue("outgoing", connection=redis_client).scheduled_job_registry
    retries = [job.id for job in Job.fetch_many(registry.get_job_ids(), redis_client)
               if job.func_name == "worker.jobs.notify_lock"]
    assert len(retries) == 1

    sink.handler.refuse_with = None
    # The retry is due a few seconds later; making it due now is what waiting would do.
    redis_client.zadd(registry.key, {retries[0]: 0}, xx=True)
    worker.burst(sink)
    assert sorted(m.rcpt_tos[0] for m in sink.handler.messages) == [
        "alice@example.com", "postmaster@example.com"]


def test_a_notice_the_next_hop_defers_does_not_hold_back_the_alert(alice, sink, redis_client):
    worker.defer_recipient(sink, "alice@example.com")
    worker.lock("user", alice)
    worker.burst(sink)
    assert [m.rcpt_tos for m in sink.handler.messages] == [["postmaster@example.com"]]
    registry = Queue("outgoing", connection=redis_client).scheduled_job_registry
    retries = [job.id for job in Job.fetch_many(registry.get_job_ids(), redis_client)
               if job.func_name == "worker.jobs.notify_lock"]
    assert len(retries) == 1  # the notice is tried again, the alert is not sent twice

    del sink.handler.handle_RCPT
    redis_client.zadd(registry.key, {retries[0]: 0}, xx=True)
    worker.burst(sink)
    assert [m.rcpt_tos for m in sink.handler.messages] == [["postmaster@example.com"],
                                                           ["alice@example.com"]]


def test_identity_lock_tells_the_identity_and_names_it_in_the_alert(instance, redis_client,
                                                                    sink):
    user_id = data.add_user("example.com", "domain", "example.com", "Domain-pass-123")
    worker.set_domain("example.com", abuse_report_address="postmaster@example.com")
    identity_id = data.add_identity(user_id, "news@example.com")
    worker.add_spam("example.com", user_id, identity="news@example.com",
                    mail_from="news@example.com", subject="Newsletter blast")
    worker.add_spam("example.com", user_id, identity="other@example.com",
                    mail_from="other@example.com", subject="Not this one")

    worker.lock("identity", identity_id)
    worker.burst(sink)

    assert "news@example.com" in mail_to(sink, "news@example.com")["Subject"]
    text = mail_to(sink, "postmaster@example.com").get_content()
    assert "identity news@example.com of example.com" in text
    assert "Newsletter blast" in text and "Not this one" not in text


def test_ip_user_lock_notice_goes_to_the_contact_email_set_in_the_panel(instance, app,
                                                                         sink):
    from tests.integration.test_panel_settings import settings

    user_id = data.add_user("example.com", "ip", "192.0.2.0/24")
    worker.set_domain("example.com", abuse_report_address="postmaster@example.com")
    data.add_admin(ADMIN, ADMIN_PW, domain="example.com")
    client = app.test_client()
    log_in(client)
    page = client.get(f"/outgoing/users/{user_id}").get_data(as_text=True)
    saved = client.post(f"/outgoing/users/{user_id}", data=settings(
        csrf_token=csrf_from(page), contact_email="ops@example.com"))
    assert saved.status_code == 302, saved.get_data(as_text=True)[-2000:]

    worker.lock("user", user_id)
    worker.burst(sink)

    assert "192.0.2.0/24" in mail_to(sink, "ops@example.com")["Subject"]


def test_alert_link_opens_confirmation_and_only_the_post_unlocks(alice, sink, app,
                                                                 redis_client):
    data.add_admin(ADMIN, ADMIN_PW, domain="example.com")
    token = locked_and_alerted(sink, alice)
    client = app.test_client()

    assert client.get(f"/unlock/{token}").status_code == 302  # to the login page
    log_in(client)
    page = client.get(f"/unlock/{token}")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert "Unlock Authenticating User alice@example.com?" in html
    assert "5 spam messages in 10 minutes" in html
    assert worker.target("user", alice).locked  # a bare GET changes nothing

    done = client.post(f"/unlock/{token}", data={"csrf_token": csrf_from(html)})
    assert done.status_code == 200 and "can send mail again" in done.get_data(as_text=True)
    assert not worker.target("user", alice).locked
    assert redis_client.get(redis_keys.user_lock(alice)) is None
    event = data.query(lambda s: s.scalars(select(AuditEvent).where(
        AuditEvent.action == "unlock")).one())
    assert event.actor == ADMIN and event.target_id == alice


def test_unlock_through_the_link_empties_the_spam_windows(alice, sink, app, redis_client):
    data.add_admin(ADMIN, ADMIN_PW, domain="example.com")
    worker.add_spam("example.com", alice, identity="alice@example.com")
    for key in (redis_keys.user_spam(alice), redis_keys.identity_spam(alice, "alice@example.com")):
        redis_client.zadd(key, {f"event-{n}": time.time() for n in range(5)})
    token = locked_and_alerted(sink, alice)
    client = app.test_client()
    log_in(client)
    assert confirm(client, token).status_code == 200
    assert redis_client.exists(redis_keys.user_spam(alice)) == 0
    assert redis_client.exists(redis_keys.identity_spam(alice, "alice@example.com")) == 0


def test_second_use_of_a_link_is_refused(alice, sink, app):
    data.add_admin(ADMIN, ADMIN_PW, domain="example.com")
    token = locked_and_alerted(sink, alice)
    client = app.test_client()
    log_in(client)
    assert confirm(client, token).status_code == 200

    worker.lock("user", alice)  # locked again; the old link must not lift the new lock
    again = client.get(f"/unlock/{token}")
    assert again.status_code == 410
    assert "already been used" in again.get_data(as_text=True)
    assert client.post(f"/unlock/{token}", data={
        "csrf_token": csrf_from(client.get("/outgoing/users").get_data(as_text=True))},
    ).status_code == 410
    assert worker.target("user", alice).locked


def test_expired_link_is_refused(alice, sink, app):
    data.add_admin(ADMIN, ADMIN_PW, domain="example.com")
    lock_id = worker.lock("user", alice)
    secret = app.config["SECRET_KEY"]
    stale = make_unlock_token(secret, kind="user", target_id=alice, lock_id=lock_id,
                              now=time.time() - app.config["UNLOCK_LINK_MAX_AGE"] - 60)
    client = app.test_client()
    log_in(client)
    response = client.get(f"/unlock/{stale}")
    assert response.status_code == 410 and "expired" in response.get_data(as_text=True)
    assert worker.target("user", alice).locked


def test_tampered_link_is_refused_and_unlocks_nothing(alice, sink, app):
    data.add_admin(ADMIN, ADMIN_PW, domain="example.com")
    token = locked_and_alerted(sink, alice)
    payload, _, signature = token.partition(".")
    forged = payload[:-2] + ("AA" if not payload.endswith("AA") else "BB") + "." + signature
    client = app.test_client()
    log_in(client)
    csrf = csrf_from(client.get("/outgoing/users").get_data(as_text=True))
    for bad in (forged, token[:-3], "not-a-token"):
        assert client.get(f"/unlock/{bad}").status_code == 400
        assert client.post(f"/unlock/{bad}", data={"csrf_token": csrf}).status_code == 400
    assert worker.target("user", alice).locked


def test_post_without_csrf_token_does_not_unlock(alice, sink, app):
    data.add_admin(ADMIN, ADMIN_PW, domain="example.com")
    token = locked_and_alerted(sink, alice)
    client = app.test_client()
    log_in(client)
    assert client.post(f"/unlock/{token}").status_code == 400
    assert worker.target("user", alice).locked
    assert confirm(client, token).status_code == 200  # the link itself is still good


def test_admin_of_another_domain_cannot_use_the_link(alice, sink, app):
    data.add_admin("ops@other.example", "Other-pass-123", domain="other.example")
    token = locked_and_alerted(sink, alice)
    client = app.test_client()
    log_in(client, "ops@other.example", "Other-pass-123")
    assert client.get(f"/unlock/{token}").status_code == 404
    csrf = csrf_from(client.get("/outgoing/users").get_data(as_text=True))
    assert client.post(f"/unlock/{token}", data={"csrf_token": csrf}).status_code == 404
    assert worker.target("user", alice).locked


def test_a_moved_users_alert_and_link_show_none_of_its_old_domains_spam(alice, sink, app):
    """The provider moved alice to other.example; what it sent while in example.com stays
    example.com's, in the alert to other.example and on the page its link opens."""
    for n in range(3):
        worker.add_spam("example.com", alice, subject=f"Example.com board minutes {n}",
                        rcpts=("banker@example.org",))
    data.move_user(alice, "other.example")
    worker.set_domain("other.example", abuse_report_address="postmaster@other.example")
    worker.add_spam("other.example", alice, subject="Prize draw", rcpts=("victim@example.net",))
    data.add_admin("ops@other.example", "Other-pass-123", domain="other.example")

    worker.lock("user", alice)
    worker.burst(sink)

    alert = mail_to(sink, "postmaster@other.example")
    page = app.test_client()
    log_in(page, "ops@other.example", "Other-pass-123")
    html = page.get(f"/unlock/{token_of(alert)}").get_data(as_text=True)
    shown = {"alert": alert.get_content(), "unlock page": html}
    assert all("Prize draw" in text and "victim@example.net" in text for text in shown.values())
    assert [where for where, text in shown.items() if "Example.com board minutes" in text
            or "banker@example.org" in text] == []


def test_link_of_a_lock_that_ended_and_was_replaced_is_refused(alice, sink, app):
    data.add_admin(ADMIN, ADMIN_PW)  # a super admin may act on every domain
    token = locked_and_alerted(sink, alice)
    worker.unlock("user", alice)
    client = app.test_client()
    log_in(client)
    ended = client.get(f"/unlock/{token}")
    assert ended.status_code == 409 and "already ended" in ended.get_data(as_text=True)

    worker.lock("user", alice)
    replaced = client.get(f"/unlock/{token}")
    assert replaced.status_code == 409 and "locked again" in replaced.get_data(as_text=True)
    assert worker.target("user", alice).locked


def lock_notice_results(redis_client) -> list[str]:
    """What the finished notify_lock jobs said they did (the job's result is the record)."""
    registry = Queue("outgoing", connection=redis_client).finished_job_registry
    return [job.return_value() for job in Job.fetch_many(registry.get_job_ids(), redis_client)
            if job is not None and job.func_name == "worker.jobs.notify_lock"]


SPAM_TEMPLATE = {"subject": "Cheap watches", "body": "Cheap watches - visit http://spam.example\n"}


def customer_template(user_id: int) -> None:
    """The lock template a domain admin wrote: any text they like."""
    def use(session):
        session.get(OutgoingUser, user_id).lock_template = LockTemplate(name="a",
                                                                        **SPAM_TEMPLATE)
    data.query(use)


def test_spam_sent_as_another_domains_address_locks_it_but_the_notice_goes_to_the_contact(
        instance, redis_client, start_proxy, clock, sink):
    """A customer's IP user sends GTUBE as victim@b.test five times: the identity is locked,
    and the customer's own template goes to the user's contact, never to victim@b.test."""
    from tests.support.mail import GTUBE, client, message, send

    user_id = data.add_user("example.com", "ip", "127.0.0.0/24", automatic_lock=False,
                            lock_identities_automatically=True, contact_email="ops@example.com")
    worker.set_domain("example.com", abuse_report_address="postmaster@example.com")
    customer_template(user_id)
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        for _ in range(5):
            code, reply = send(smtp, message(body=GTUBE, sender="victim@b.test"),
                               sender="victim@b.test")
            assert code == 550, reply
            clock.advance(30)
    victim = data.query(lambda s: s.scalars(select(Identity).where(
        Identity.user_id == user_id, Identity.value == "victim@b.test")).one())
    assert victim.locked

    worker.burst(sink)

    assert not [m for m in sink.handler.messages if "victim@b.test" in m.rcpt_tos]
    assert "Cheap watches - visit" in mail_to(sink, "ops@example.com").get_content()
    [alert] = [parsed(m) for m in sink.handler.messages  # the others are ARF reports
               if m.rcpt_tos == ["postmaster@example.com"]
               and parsed(m).get_content_type() != "multipart/report"]
    assert "identity victim@b.test of 127.0.0.0/24" in alert.get_content()
    [result] = lock_notice_results(redis_client)
    assert "identity victim@b.test is not an address of the user's domain example.com" in result
    assert "notice sent to ops@example.com" in result


@pytest.mark.parametrize("identity", [
    "victim@b.test",
    "victim@mail.example.com",       # a subdomain is another host, not the user's domain
    "victim@example.com.b.test",
    "victim@example.co",
    "victim%b.test@example.com",     # the percent hack routes on to b.test
    "b.test!victim@example.com",     # and so does a bang path
    '"victim@b.test"@example.com',
    "victim@b.test@example.com",
    "victim@example.com,other@b.test",
])
def test_identity_outside_the_users_domain_without_a_contact_is_told_nothing(
        identity, instance, redis_client, sink):
    user_id = data.add_user("example.com", "ip", "192.0.2.0/24")
    customer_template(user_id)
    identity_id = data.add_identity(user_id, identity)

    worker.lock("identity", identity_id)
    worker.burst(sink)

    assert sink.handler.messages == []  # no abuse address either: nobody is mailed
    [result] = lock_notice_results(redis_client)
    assert f"identity {identity} is not an address of the user's domain example.com" in result
    assert "no address to tell the sender" in result


@pytest.mark.parametrize(("domain", "identity", "told"), [
    ("example.com", "News@EXAMPLE.com", "News@example.com"),
    ("example.com", "news@example.com.", "news@example.com"),
    ("bücher.example", "news@BÜCHER.example", "news@xn--bcher-kva.example"),
    ("bücher.example", "news@xn--bcher-kva.example", "news@xn--bcher-kva.example"),
])
def test_identity_in_the_users_own_domain_is_told_in_any_spelling_of_it(
        domain, identity, told, instance, redis_client, sink):
    user_id = data.add_user(domain, "ip", "192.0.2.0/24", contact_email="ops@example.net")
    customer_template(user_id)
    identity_id = data.add_identity(user_id, identity)

    worker.lock("identity", identity_id)
    worker.burst(sink)

    assert mail_to(sink, told)["Subject"] == "Cheap watches"
    assert [m.rcpt_tos for m in sink.handler.messages] == [[told]]
    [result] = lock_notice_results(redis_client)
    assert "not an address" not in result


def test_an_identity_spelled_as_encoded_words_neither_silences_nor_forges_the_alert(
        instance, redis_client, sink):
    """The sender chooses its identity, and "=?...?=" is a valid local part. The email
    package read it as an encoded word: as the notice's To it decoded to CR LF and the job
    crashed on every retry, so the domain's admin was never alerted of the lock; inside the
    alert's Subject it put a header, or a whole forged body, of the sender's choosing. Now
    both mails go out, with the identity shown as it is."""
    forged = "=?utf-8?q?x=0D=0AReply-To=3A_e=40a.test=0D=0A=0D=0AClick?="  # 59 characters
    identity = f"{forged}@example.com"
    user_id = data.add_user("example.com", "domain", "example.com", "Domain-pass-123")
    worker.set_domain("example.com", abuse_report_address="postmaster@example.com")
    identity_id = data.add_identity(user_id, identity)

    worker.lock("identity", identity_id)
    worker.burst(sink)

    # (aiosmtpd, the sink, decodes the envelope address itself; the notice is the other mail)
    [notice] = [parsed(m) for m in sink.handler.messages
                if m.rcpt_tos != ["postmaster@example.com"]]
    assert notice["To"] == "undisclosed-recipients:;" and notice["Reply-To"] is None
    alert = mail_to(sink, "postmaster@example.com")
    assert alert["Subject"] == f"[Outbound Guard] Locked: identity {identity} of example.com"
    assert alert["Reply-To"] is None
    assert token_of(alert)


def test_an_encoded_word_in_the_identity_puts_no_header_into_the_alert(instance, redis_client,
                                                                      sink):
    """Not an address the notice can go to, so only the alert is sent: its Subject names the
    identity, which the email package decoded into a Reply-To header and a body of the
    sender's choosing."""
    identity = ("=?utf-8?q?x=0D=0AReply-To:_evil@attacker.test=0D=0A=0D=0AForged?="
                "@example.com")
    user_id = data.add_user("example.com", "domain", "example.com", "Domain-pass-123")
    worker.set_domain("example.com", abuse_report_address="postmaster@example.com")
    identity_id = data.add_identity(user_id, identity)

    worker.lock("identity", identity_id)
    worker.burst(sink)

    alert = mail_to(sink, "postmaster@example.com")
    assert alert["Reply-To"] is None
    assert alert["Subject"] == f"[Outbound Guard] Locked: identity {identity} of example.com"
    assert "Outbound Guard has locked" in alert.get_content()


def test_a_spam_subject_cannot_add_lines_to_the_alert(alice, sink):
    """The quarantined messages' subjects are the sender's text, newlines and all (decoded
    from an encoded word): in the alert they wrote lines of their own beside the real unlock
    link, such as a link of the sender's. Each is shown on its one line now."""
    from scoring.message import parse_headers, subject_of

    raw = (b"From: alice@example.com\r\nSubject: =?utf-8?q?Invoice=0A=0AUnlock,_after_you_have"
           b"_checked_the_sender:=0Ahttp://evil.test/unlock?=\r\n\r\nBuy now.\r\n")
    forged = subject_of(parse_headers(raw))  # what the proxy stores with the message
    assert "\nhttp://evil.test/unlock" in forged
    worker.add_spam("example.com", alice, subject=forged, raw=raw)
    worker.lock("user", alice)
    worker.burst(sink)

    text = mail_to(sink, "postmaster@example.com").get_content()
    lines = text.splitlines()
    assert "http://evil.test/unlock" not in lines
    assert not any(line.startswith("Unlock, after you have checked the sender:")
                   for line in lines)
    assert ("  Subject: Invoice Unlock, after you have checked the sender: "
            "http://evil.test/unlock") in lines


def notify_job_id(redis_client) -> str:
    [job] = [job for job in Queue("outgoing", connection=redis_client).get_jobs()
             if job.func_name == "worker.jobs.notify_lock"]
    return job.id


def test_mail_whose_worker_died_mid_send_is_sent_by_the_retry_or_the_next_job(
        alice, sink, redis_client):
    """A worker killed while it sent left the mail's marker behind, and every later run
    took it for "sent": the notice was lost. The marker names the job that sends; RQ's retry
    of that job (the same id), or another job once that one has ended, sends."""
    lock_id = worker.lock("user", alice)
    redis_client.set(f"og:sent:{lock_id}:notice", notify_job_id(redis_client))  # retried
    redis_client.set(f"og:sent:{lock_id}:alert", "a-job-long-gone")
    worker.burst(sink)
    assert sorted(m.rcpt_tos[0] for m in sink.handler.messages) == [
        "alice@example.com", "postmaster@example.com"]
    assert redis_client.get(f"og:sent:{lock_id}:notice") == b"sent"
    assert redis_client.get(f"og:sent:{lock_id}:alert") == b"sent"


def test_the_marker_names_the_sending_job_and_says_sent_only_after_the_next_hop_took_it(
        alice, sink, redis_client):
    lock_id = worker.lock("user", alice)
    job_id = notify_job_id(redis_client)
    notice = f"og:sent:{lock_id}:notice"
    sink.handler.refuse_with = "451 4.3.0 try again later"
    worker.burst(sink)
    assert redis_client.get(notice) is None  # deferred: nothing claims it was sent

    sink.handler.refuse_with = None
    sink.handler.data_started.clear()
    sink.handler.delay = 3  # the next hop takes its time over DATA
    registry = Queue("outgoing", connection=redis_client).scheduled_job_registry
    redis_client.zadd(registry.key, {job_id: 0}, xx=True)  # RQ's retry, due now
    proc = subprocess.Popen(procfile_worker("--burst"), cwd=ROOT,
                            env=worker.worker_env(sink), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert sink.handler.data_started.wait(30)
        assert redis_client.get(notice) == job_id.encode()  # on its way, not yet sent
    finally:
        assert proc.wait(60) == 0
    assert redis_client.get(notice) == b"sent"
    assert sorted(m.rcpt_tos[0] for m in sink.handler.messages) == [
        "alice@example.com", "postmaster@example.com"]


def test_an_alert_to_an_idn_domain_names_the_domain_in_a_label_form(instance, redis_client,
                                                                     sink):
    """Sent as it was written, the address made smtplib fail on every try (non-ASCII in an
    SMTP command without SMTPUTF8): the alert never went out."""
    user_id = data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123")
    worker.set_domain("example.com", abuse_report_address="ops@bücher.example")
    worker.lock("user", user_id)
    worker.burst(sink)
    [alert] = [m for m in sink.handler.messages
               if m.rcpt_tos == ["ops@xn--bcher-kva.example"]]
    assert "SMTPUTF8" not in alert.mail_options  # a domain needs none
    assert alert.data.isascii()
    assert parsed(alert)["To"] == "ops@xn--bcher-kva.example"


def test_an_alert_to_a_non_ascii_mailbox_asks_for_smtputf8(instance, redis_client):
    user_id = data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123")
    worker.set_domain("example.com", abuse_report_address="jürgen@bücher.example")
    worker.lock("user", user_id)
    hop = Sink(smtputf8=True).start()
    try:
        worker.burst(hop)
        [alert] = [m for m in hop.handler.messages
                   if m.rcpt_tos == ["jürgen@xn--bcher-kva.example"]]
    finally:
        hop.stop()
    assert "SMTPUTF8" in alert.mail_options
    assert parsed(alert)["To"] == "jürgen@xn--bcher-kva.example"


def test_a_template_of_another_domain_is_never_sent_to_a_users_senders(instance):
    """A super admin moves a shared template to one.example while two.example's admin picks
    it for a user: both checks pass, and the user ends up with one.example's template, which
    one.example's admin may rewrite at will. Its notice is then the default one."""
    from outgoing.users import get_or_create_domain
    from worker.lock_mail import sender_notice

    user_id = data.add_user("two.example", "user", "dave@two.example", "Dave-pass-123")

    def assign(domain_name):
        def do(session):
            user = session.get(OutgoingUser, user_id)
            user.lock_template = LockTemplate(
                name="t", subject="Pay us to unlock",
                body="Send bitcoin", domain_id=get_or_create_domain(session, domain_name).id)
            session.flush()
            return sender_notice(user)
        return data.query(do)

    other = assign("one.example")
    assert "Pay us" not in other.subject and "bitcoin" not in other.body
    assert other.subject == data.query(lambda s: sender_notice(
        _without_template(s, user_id))).subject
    own = assign("two.example")
    assert own.subject == "Pay us to unlock"


def _without_template(session, user_id):
    user = session.get(OutgoingUser, user_id)
    user.lock_template = None
    return user
