"""A domain admin's outside address for the domain's notices gets nothing but a confirmation
link until someone there confirms it (``outgoing.notify_addresses``): else a customer could
have the provider mail its quarantined spam (abuse reports carry it whole), or its lock
template's text, to anyone. Real panel (test client), real RQ worker, real SMTP sink."""

from __future__ import annotations

import email
import email.policy
import re

from rq import Queue
from rq.job import Job
from sqlalchemy import select

from outgoing.jobs import enqueue
from outgoing.models import ConfirmedAddress, Domain
from outgoing.tokens import make_confirm_token
from tests.integration.test_panel_users import ROOT, ROOT_PW, Panel, _csrf, text
from tests.support import data, worker
from tests.support.worker import PUBLIC_URL

ADMIN, ADMIN_PW = "ops@example.com", "Ops-pass-123"
OUTSIDE = "victim@elsewhere.example"
CONFIRM_LINK = re.compile(re.escape(PUBLIC_URL) + r"(/confirm-address/\S+)")


def domain_id(name: str = "example.com") -> int:
    return data.query(lambda s: s.scalar(select(Domain.id).where(Domain.name == name)))


def confirmed(name: str = "example.com") -> list[str]:
    return data.query(lambda s: list(s.scalars(select(ConfirmedAddress.address).where(
        ConfirmedAddress.domain_id == select(Domain.id).where(Domain.name == name)
        .scalar_subquery()))))


def mails_to(sink, address: str) -> list:
    return [email.message_from_bytes(m.data, policy=email.policy.default)
            for m in sink.handler.messages if m.rcpt_tos == [address]]


def results(func: str) -> list[str]:
    client = worker.redis_client()
    registry = Queue("outgoing", connection=client).finished_job_registry
    return [job.return_value() for job in Job.fetch_many(registry.get_job_ids(), client)
            if job is not None and job.func_name == func]


def customer(app) -> Panel:
    data.add_admin(ADMIN, ADMIN_PW, domain="example.com")
    return Panel(app.test_client()).login(ADMIN, ADMIN_PW)


def follow(app, path: str) -> str:
    """Open the link as whoever reads the mailbox (no login), then press Confirm."""
    visitor = Panel(app.test_client())
    page = visitor.get(path)
    assert page.status_code == 200, text(page)
    visitor.token = _csrf(text(page))
    done = visitor.post(path)
    assert done.status_code == 200, text(done)
    return text(done)


def test_an_outside_abuse_address_gets_the_link_and_no_report_until_it_is_confirmed(
        instance, app, sink):
    alice = data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123")
    panel = customer(app)
    saved = panel.post(f"/outgoing/settings/{domain_id()}", {"abuse_report_address": OUTSIDE})
    assert saved.status_code == 302, text(saved)
    assert f"{OUTSIDE} is not confirmed yet" in text(panel.get(saved.headers["Location"]))

    spam = worker.add_spam("example.com", alice)
    enqueue(worker.redis_client(), "worker.jobs.send_abuse_report", spam)
    worker.burst(sink)

    [asked] = mails_to(sink, OUTSIDE)
    assert asked["Subject"] == (f"[Outbound Guard] Confirm {OUTSIDE} for the notices of "
                                "example.com")
    assert "Buy now" not in asked.get_content()  # nothing of the customer's message
    assert results("worker.jobs.send_abuse_report") == [
        f"{OUTSIDE} is not confirmed for example.com; nothing sent"]
    path = CONFIRM_LINK.search(asked.get_content()).group(1)
    # Opening the link (a scanner does) confirms nothing; pressing the button does.
    assert Panel(app.test_client()).get(path).status_code == 200
    assert confirmed() == []
    assert f"{OUTSIDE} now gets the outgoing-mail notices of example.com" in follow(app, path)
    assert confirmed() == [OUTSIDE]

    enqueue(worker.redis_client(), "worker.jobs.send_abuse_report", spam)
    worker.burst(sink)
    [_, report] = mails_to(sink, OUTSIDE)
    assert report.get_content_type() == "multipart/report"
    assert "is not confirmed yet" not in text(panel.get(f"/outgoing/settings/{domain_id()}"))


def test_an_outside_contact_email_gets_no_lock_notice_until_confirmed(instance, app, sink):
    from tests.integration.test_panel_settings import settings
    from tests.integration.test_worker_lock_alerts import customer_template

    user_id = data.add_user("example.com", "ip", "192.0.2.0/24")
    panel = customer(app)
    saved = panel.post(f"/outgoing/users/{user_id}", settings(contact_email=OUTSIDE))
    assert saved.status_code == 302, text(saved)[-2000:]
    customer_template(user_id)  # "Cheap watches": any text the customer likes
    assert f"{OUTSIDE} is not confirmed yet" in text(panel.get(f"/outgoing/users/{user_id}"))

    worker.lock("user", user_id)
    worker.burst(sink)
    [asked] = mails_to(sink, OUTSIDE)  # the link, not the customer's template
    assert asked["Subject"].startswith("[Outbound Guard] Confirm")
    assert results("worker.jobs.notify_lock")[0].startswith("no address to tell the sender")

    follow(app, CONFIRM_LINK.search(asked.get_content()).group(1))
    worker.unlock("user", user_id)
    worker.lock("user", user_id)
    worker.burst(sink)
    assert [m["Subject"] for m in mails_to(sink, OUTSIDE)][1:] == ["Cheap watches"]


def test_the_domains_own_address_and_a_super_admins_choice_need_no_link(instance, app, sink):
    alice = data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123")
    panel = customer(app)
    assert panel.post(f"/outgoing/settings/{domain_id()}",
                      {"abuse_report_address": "Abuse@EXAMPLE.com"}).status_code == 302
    spam = worker.add_spam("example.com", alice)
    enqueue(worker.redis_client(), "worker.jobs.send_abuse_report", spam)
    worker.burst(sink)
    assert [m.rcpt_tos for m in sink.handler.messages] == [["abuse@example.com"]]

    data.add_admin(ROOT, ROOT_PW)
    root = Panel(app.test_client()).login(ROOT, ROOT_PW)
    assert root.post(f"/outgoing/settings/{domain_id()}",
                     {"abuse_report_address": "noc@provider.example"}).status_code == 302
    assert confirmed() == ["noc@provider.example"]
    worker.burst(sink)
    assert mails_to(sink, "noc@provider.example") == []  # no link: nothing to confirm


def test_a_super_admins_save_confirms_only_what_it_typed_not_the_customers_choice(
        instance, app, sink):
    """A customer's outside addresses stay unconfirmed through the provider's later saves:
    the domain's settings saved as shown, a user's other setting changed."""
    from tests.integration.test_panel_settings import settings

    user_id = data.add_user("example.com", "ip", "192.0.2.0/24")
    panel = customer(app)
    assert panel.post(f"/outgoing/settings/{domain_id()}",
                      {"abuse_report_address": OUTSIDE}).status_code == 302
    contact = "other@elsewhere.example"
    assert panel.post(f"/outgoing/users/{user_id}",
                      settings(contact_email=contact)).status_code == 302
    data.add_admin(ROOT, ROOT_PW)
    root = Panel(app.test_client()).login(ROOT, ROOT_PW)
    assert root.post(f"/outgoing/settings/{domain_id()}",
                     {"abuse_report_address": OUTSIDE}).status_code == 302
    assert root.post(f"/outgoing/users/{user_id}", settings(
        contact_email=contact, lock_timeout_minutes="90")).status_code == 302
    assert confirmed() == []
    assert f"{contact} is not confirmed yet" in text(root.get(f"/outgoing/users/{user_id}"))


def test_a_link_confirms_its_own_domain_only_and_a_changed_one_nothing(instance, app, sink):
    data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123")
    data.add_user("other.example", "user", "bob@other.example", "Bob-pass-1234")
    panel = customer(app)
    panel.post(f"/outgoing/settings/{domain_id()}", {"abuse_report_address": OUTSIDE})
    worker.burst(sink)
    [asked] = mails_to(sink, OUTSIDE)
    path = CONFIRM_LINK.search(asked.get_content()).group(1)
    token = path.rsplit("/", 1)[1]
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    assert Panel(app.test_client()).get(f"/confirm-address/{tampered}").status_code == 400
    unlock_salt = make_confirm_token("wrong secret", domain_id=domain_id("other.example"),
                                     address=OUTSIDE)
    assert Panel(app.test_client()).get(f"/confirm-address/{unlock_salt}").status_code == 400

    follow(app, path)
    assert confirmed("example.com") == [OUTSIDE]
    assert confirmed("other.example") == []


def test_confirmation_mails_are_rationed_and_go_only_to_addresses_still_named(
        instance, app, sink):
    data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123")
    panel = customer(app)
    for _ in range(3):  # saved again and again: one link a day
        panel.post(f"/outgoing/settings/{domain_id()}", {"abuse_report_address": OUTSIDE})
    worker.burst(sink)
    assert len(mails_to(sink, OUTSIDE)) == 1

    # A job for an address the domain no longer names (or never did) mails nobody.
    enqueue(worker.redis_client(), "worker.jobs.send_address_confirmation", domain_id(),
            "someone@else.example")
    # Twelve outside contacts asking on one day: ten links a day for a domain, OUTSIDE's
    # included; the rest get none.
    for n in range(12):
        address = f"list{n}@elsewhere.example"
        data.add_user("example.com", "ip", f"192.0.2.{n}", contact_email=address)
        enqueue(worker.redis_client(), "worker.jobs.send_address_confirmation", domain_id(),
                address)
    worker.burst(sink)
    assert mails_to(sink, "someone@else.example") == []
    assert "example.com no longer names someone@else.example; nothing sent" in \
        results("worker.jobs.send_address_confirmation")
    linked = [n for n in range(12) if mails_to(sink, f"list{n}@elsewhere.example")]
    assert linked == list(range(9))


def test_a_link_whose_worker_died_mid_send_is_sent_by_the_next_job(instance, app, sink):
    """A claim on the day's marker left by a job that no longer runs (its worker was killed
    while mailing the link) does not count as "already sent today": the next job sends."""
    from datetime import UTC, datetime

    from outgoing.notify_addresses import address_key

    data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123")
    panel = customer(app)
    day = datetime.now(UTC).strftime("%Y%m%d")
    worker.redis_client().set(
        f"og:sent:confirm:{domain_id()}:{address_key(OUTSIDE)}:{day}", "a-job-that-died")
    panel.post(f"/outgoing/settings/{domain_id()}", {"abuse_report_address": OUTSIDE})
    worker.burst(sink)
    assert len(mails_to(sink, OUTSIDE)) == 1


def test_an_expired_a_foreign_or_a_garbage_link_confirms_nothing(instance, app):
    """Links older than 7 days (410), for a domain that is gone (404), and junk of any kind
    (400): a clear page, never a 500, and no row."""
    import time

    from outgoing.models import Domain as DomainRow

    data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123")
    secret = app.config["SECRET_KEY"]
    old = make_confirm_token(secret, domain_id=domain_id(), address=OUTSIDE,
                             now=time.time() - 8 * 86400)
    gone = make_confirm_token(secret, domain_id=domain_id() + 1000, address=OUTSIDE)
    visitor = Panel(app.test_client())
    assert visitor.get(f"/confirm-address/{old}").status_code == 410
    visitor.token = _csrf(text(visitor.get("/login")))
    assert visitor.post(f"/confirm-address/{old}").status_code == 410  # pressed too late
    assert visitor.get(f"/confirm-address/{gone}").status_code == 404
    for junk in ("x" * 5000, "a.b.c", "%00%0d%0a", "..%2f..%2fetc"):
        assert visitor.get(f"/confirm-address/{junk}").status_code in (400, 404), junk
    assert data.query(lambda s: s.scalars(select(ConfirmedAddress)).all()) == []
    assert data.query(lambda s: s.scalar(select(DomainRow.id).where(
        DomainRow.name == "example.com"))) == domain_id()


def test_retries_of_a_deferred_link_count_once_toward_the_days_ration(instance, app, sink):
    """A link the next hop deferred through all of RQ's retries is one of the domain's ten a
    day, not six of them."""
    client = worker.redis_client()
    data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123")
    customer(app).post(f"/outgoing/settings/{domain_id()}", {"abuse_report_address": OUTSIDE})
    sink.handler.refuse_with = "451 4.3.0 Try again later"
    registry = Queue("outgoing", connection=client).scheduled_job_registry
    for _ in range(6):  # the first run and its five retries
        worker.burst(sink)
        for job_id in registry.get_job_ids():
            client.zadd(registry.key, {job_id: 0}, xx=True)
    assert sink.handler.messages == [] and registry.get_job_ids() == []

    sink.handler.refuse_with = None
    for n in range(9):
        address = f"list{n}@elsewhere.example"
        data.add_user("example.com", "ip", f"192.0.2.{n}", contact_email=address)
        enqueue(client, "worker.jobs.send_address_confirmation", domain_id(), address)
    worker.burst(sink)
    assert [n for n in range(9) if mails_to(sink, f"list{n}@elsewhere.example")] == \
        list(range(9))
