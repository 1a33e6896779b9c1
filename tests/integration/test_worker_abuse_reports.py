"""Abuse reports (RFC 5965) mailed by the real worker for quarantined messages."""

from __future__ import annotations

import email
import email.policy
from datetime import timedelta

import pytest
from sqlalchemy import update

from outgoing.config import load_config
from outgoing.jobs import enqueue
from outgoing.models import QuarantinedMessage, utcnow
from outgoing.storage import FileStore
from tests.support import data, worker
from tests.support.mail import message

ABUSE = "abuse@example.com"


@pytest.fixture
def alice(instance, redis_client):
    user_id = data.add_user("example.com", "user", "alice@example.com", "Alice-pass-123")
    worker.set_domain("example.com", abuse_report_address=ABUSE)
    return user_id


def report_jobs(*message_ids: int) -> None:
    client = worker.redis_client()
    for message_id in message_ids:
        enqueue(client, "worker.jobs.send_abuse_report", message_id)


def reports(sink):
    return [email.message_from_bytes(m.data, policy=email.policy.default)
            for m in sink.handler.messages if m.rcpt_tos == [ABUSE]]


def test_report_parses_into_three_parts_with_the_required_fields(alice, sink):
    original = message(sender="alice@example.com", to="victim@example.org",
                       subject="Cheap pills", body="Buy now.\n")
    config = load_config()
    key = "quarantine/2026/11/29/report-test.eml"
    FileStore(config["STORAGE_DIR"]).put(key, original)
    row_id = worker.add_spam("example.com", alice, rcpts=("victim@example.org",
                                                          "other@example.net"))
    data.query(lambda s: setattr(s.get(QuarantinedMessage, row_id), "body", None)
               or setattr(s.get(QuarantinedMessage, row_id), "storage_key", key))

    report_jobs(row_id)
    worker.burst(sink)

    [report] = reports(sink)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "feedback-report"
    human, feedback, attached = report.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert "classified as spam" in human.get_content()
    assert feedback.get_content_type() == "message/feedback-report"
    fields = feedback.get_payload()[0]
    assert fields["Feedback-Type"] == "abuse"
    assert fields["Version"] == "1"
    assert fields["User-Agent"]
    assert fields["Original-Mail-From"] == "<alice@example.com>"
    assert fields.get_all("Original-Rcpt-To") == ["<victim@example.org>",
                                                  "<other@example.net>"]
    assert fields["Arrival-Date"]
    assert fields["Source-IP"] == "192.0.2.10"
    assert fields["Reported-Domain"] == "example.com"
    assert "smtp.auth=alice@example.com" in fields["Authentication-Results"]
    assert attached.get_content_type() == "message/rfc822"
    assert attached.get_payload()[0]["Subject"] == "Cheap pills"


def test_original_kept_in_the_database_is_attached(alice, sink):
    row_id = worker.add_spam("example.com", alice, subject="Stored in the row")
    report_jobs(row_id)
    worker.burst(sink)
    [report] = reports(sink)
    attached = list(report.iter_parts())[2]
    assert attached.get_payload()[0]["Subject"] == "Stored in the row"


def test_no_report_without_an_abuse_report_address(alice, sink):
    worker.set_domain("example.com", abuse_report_address=None)
    report_jobs(worker.add_spam("example.com", alice))
    worker.burst(sink)
    assert sink.handler.messages == []


def test_a_message_is_reported_once_even_if_its_job_runs_twice(alice, sink):
    row_id = worker.add_spam("example.com", alice)
    report_jobs(row_id, row_id)
    worker.burst(sink)
    assert len(reports(sink)) == 1


def test_an_outbreak_gets_ten_reports_an_hour_and_one_digest_for_the_rest(alice, sink):
    hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    ids = [worker.add_spam("example.com", alice, subject=f"Spam wave {n}",
                           received_at=hour + timedelta(minutes=n))
           for n in range(13)]
    report_jobs(*ids)
    worker.burst(sink)  # the digest is scheduled for the end of that hour, already past

    arf = [r for r in reports(sink) if r.get_content_type() == "multipart/report"]
    assert len(arf) == 10

    worker.burst(sink)  # a worker picks up the due digest
    digests = [r for r in reports(sink) if r.get_content_type() == "text/plain"]
    assert len(digests) == 1
    text = digests[0].get_content()
    assert "3 more outgoing messages from example.com" in text
    subjects = [line.strip() for line in text.splitlines() if "Subject:" in line]
    assert subjects == ["Subject: Spam wave 10", "Subject: Spam wave 11",
                        "Subject: Spam wave 12"]


def test_limit_counts_per_domain(alice, sink):
    data.add_user("other.example", "domain", "other.example", "Other-pass-123")
    worker.set_domain("other.example", abuse_report_address=ABUSE)
    hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    ids = [worker.add_spam("example.com", alice, received_at=hour) for _ in range(10)]
    ids.append(worker.add_spam("other.example", None, received_at=hour))
    report_jobs(*ids)
    worker.burst(sink)
    assert len([r for r in reports(sink) if r.get_content_type() == "multipart/report"]) == 11


def test_digest_lists_only_its_own_domains_messages_when_an_id_was_reused(alice, sink):
    """A message left for example.com's digest is deleted before the digest runs, and
    other.example's next message gets its id (as SQLite hands out the highest id again)."""
    other_abuse = "abuse@other.example"
    data.add_user("other.example", "domain", "other.example", "Other-pass-123")
    worker.set_domain("other.example", abuse_report_address=other_abuse)
    hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    ids = [worker.add_spam("example.com", alice, subject=f"Spam wave {n}",
                           received_at=hour + timedelta(minutes=n))
           for n in range(12)]
    report_jobs(*ids)
    worker.burst(sink)  # ten reports; the digest (waves 10 and 11) is due at once

    gone = ids[-1]
    data.query(lambda s: s.delete(s.get(QuarantinedMessage, gone)))
    reused = worker.add_spam("other.example", None, subject="Other customer's secret",
                             mail_from="bob@other.example",
                             received_at=hour + timedelta(minutes=30))
    if reused != gone:  # PostgreSQL never hands an id out twice: give it the id by hand
        data.query(lambda s: s.execute(update(QuarantinedMessage)
                                       .where(QuarantinedMessage.id == reused)
                                       .values(id=gone)))
    worker.burst(sink)

    [digest] = [r for r in reports(sink) if r.get_content_type() == "text/plain"]
    text = digest.get_content()
    assert "1 more outgoing messages from example.com" in text
    assert "Spam wave 10" in text
    assert "Other customer's secret" not in text
    assert "bob@other.example" not in text


def test_a_report_carrying_8_bit_mail_announces_it_and_ascii_mail_does_not(alice, sink):
    """The quarantined message goes whole into the report (message/rfc822, which cannot be
    re-encoded to 7 bits): MAIL says BODY=8BITMIME for it, as RFC 6152 asks."""
    eight_bit = message(subject="Prix", body="Achetez maintenant, c'est très bon.\n")
    assert not eight_bit.isascii()
    report_jobs(worker.add_spam("example.com", alice, raw=eight_bit))
    report_jobs(worker.add_spam("example.com", alice))
    worker.burst(sink)
    announced = sorted("BODY=8BITMIME" in r.mail_options for r in sink.handler.messages)
    assert announced == [False, True]


def test_a_report_to_an_idn_domain_names_the_domain_in_a_label_form(alice, sink):
    worker.set_domain("example.com", abuse_report_address="abuse@bücher.example")
    report_jobs(worker.add_spam("example.com", alice))
    worker.burst(sink)
    [received] = sink.handler.messages
    assert received.rcpt_tos == ["abuse@xn--bcher-kva.example"]
    assert "SMTPUTF8" not in received.mail_options
    report = email.message_from_bytes(received.data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report["To"] == "abuse@xn--bcher-kva.example"
