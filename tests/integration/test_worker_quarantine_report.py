"""The daily quarantine report, sent by the real worker to each domain that switched it on.

The run's due time is the job's argument (as the periodic chain passes it), so the test says
which day is reported instead of waiting for 06:00.
"""

from __future__ import annotations

import email
import email.policy
from datetime import timedelta

import pytest
from rq import Queue
from rq.job import Job

from outgoing.jobs import enqueue
from outgoing.models import utcnow
from tests.support import data, worker

CONTACT = "postmaster@example.com"


@pytest.fixture
def example(instance, redis_client):
    alice = data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123")
    shop = data.add_user("example.com", "domain", "example.com", "Domain-pass-123")
    worker.set_domain("example.com", abuse_report_address=CONTACT,
                      quarantine_report_enabled=True)
    return alice, shop


def run_report(sink, due) -> list:
    enqueue(worker.redis_client(), "worker.jobs.send_quarantine_reports", due.isoformat())
    worker.burst(sink)
    return [email.message_from_bytes(m.data, policy=email.policy.default)
            for m in sink.handler.messages]


def test_report_counts_users_identities_and_top_subjects_of_the_last_day(example, sink):
    alice, shop = example
    due = utcnow().replace(microsecond=0)
    for n in range(3):
        worker.add_spam("example.com", alice, subject="Cheap pills", identity="alice@example.com",
                        received_at=due - timedelta(hours=n + 1))
    for n in range(2):
        worker.add_spam("example.com", shop, subject=f"Newsletter {n}",
                        identity="news@example.com", received_at=due - timedelta(hours=3))
    worker.add_spam("example.com", shop, subject="Last week", received_at=due - timedelta(days=3))
    data.add_user("other.example", "domain", "other.example", "Other-pass-123")
    worker.set_domain("other.example", abuse_report_address="postmaster@other.example")
    worker.add_spam("other.example", None, subject="Not reported")

    [report] = run_report(sink, due)

    assert report["To"] == CONTACT
    assert report["Subject"] == ("[Outbound Guard] Quarantine report for example.com: "
                                 "5 messages")
    lines = [" ".join(line.split()) for line in report.get_content().splitlines()]
    assert "3 alice@example.com" in lines
    assert "2 example.com" in lines
    assert "3 alice@example.com (user alice@example.com)" in lines
    assert "2 news@example.com (user example.com)" in lines
    assert lines.index("3 Cheap pills") < lines.index("1 Newsletter 0")
    assert not any("Last week" in line or "Not reported" in line for line in lines)


def test_no_report_when_nothing_was_quarantined_or_the_domain_did_not_ask(example, sink):
    alice, _ = example
    due = utcnow()
    assert run_report(sink, due) == []

    worker.set_domain("example.com", quarantine_report_enabled=False)
    worker.add_spam("example.com", alice, received_at=due - timedelta(hours=1))
    assert run_report(sink, due) == []


def test_the_same_day_is_reported_once(example, sink):
    alice, _ = example
    due = utcnow().replace(microsecond=0)
    worker.add_spam("example.com", alice, received_at=due - timedelta(hours=1))
    assert len(run_report(sink, due)) == 1
    assert len(run_report(sink, due)) == 1  # the sink still holds only the first one


def test_a_domain_whose_contact_the_next_hop_defers_holds_back_no_other_domains_report(
        example, sink, redis_client):
    alice, _shop = example
    data.add_user("aaa.example", "domain", "aaa.example", "Aaa-pass-123")
    worker.set_domain("aaa.example", abuse_report_address="postmaster@aaa.example",
                      quarantine_report_enabled=True)
    due = utcnow().replace(microsecond=0)
    worker.add_spam("aaa.example", None, subject="First in line",
                    received_at=due - timedelta(hours=1))
    worker.add_spam("example.com", alice, subject="Cheap pills",
                    received_at=due - timedelta(hours=1))

    worker.defer_recipient(sink, "postmaster@aaa.example")
    [report] = run_report(sink, due)
    assert report["To"] == CONTACT  # reported although aaa.example, before it, was deferred
    registry = Queue("outgoing", connection=redis_client).scheduled_job_registry
    [retry] = [job.id for job in Job.fetch_many(registry.get_job_ids(), redis_client)
               if job.func_name == "worker.jobs.send_quarantine_reports"]

    del sink.handler.handle_RCPT
    redis_client.zadd(registry.key, {retry: 0}, xx=True)
    worker.burst(sink)
    assert [m.rcpt_tos for m in sink.handler.messages] == [[CONTACT],
                                                           ["postmaster@aaa.example"]]
