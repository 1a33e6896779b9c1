"""The reliable relay: 250 only when the next hop took the message, its refusals passed back,
451 when it is down or dies mid-transfer, TLS and AUTH to it, no SMTP smuggling, SIZE."""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from rq import Queue
from rq.job import Job
from rq.registry import ScheduledJobRegistry
from sqlalchemy import func, select

from outgoing import message_log
from outgoing.models import ArchivedMessage
from proxy.tls import server_context
from tests.support import data
from tests.support.content import NextHop
from tests.support.mail import client, message, send
from tests.support.services import (
    ROOT,
    free_port,
    process_env,
    procfile_worker,
    run_worker_burst,
)

PASSWORD = "Alice-pass-123"


@pytest.fixture
def alice(instance):
    return data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                         message_archiving=True)


@pytest.fixture
def hop():
    server = NextHop().start()
    yield server
    server.stop()


def proxy_to(start_proxy, hop, **config):
    return start_proxy(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}", **config)


def submit(proxy, msg=None, rcpts=("bob@example.org",)) -> tuple[int, bytes]:
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        return send(smtp, msg or message(), rcpts=rcpts)


def archived() -> int:
    return data.query(lambda s: s.scalar(select(func.count(ArchivedMessage.id))))


def test_next_hop_offering_starttls_gets_the_message_over_tls(alice, start_proxy, tmp_path):
    tls = server_context(str(tmp_path / "hop.pem"), str(tmp_path / "hop.key"), "127.0.0.1")
    hop = NextHop(tls_context=tls).start()
    try:
        assert submit(proxy_to(start_proxy, hop))[0] == 250
        assert hop.handler.tls_transactions == [True]
    finally:
        hop.stop()


def test_next_hop_demanding_auth_gets_our_login(alice, start_proxy, tmp_path):
    tls = server_context(str(tmp_path / "hop.pem"), str(tmp_path / "hop.key"), "127.0.0.1")
    hop = NextHop(tls_context=tls, username="relay", password="Relay-secret-1").start()
    try:
        proxy = proxy_to(start_proxy, hop, UPSTREAM_USERNAME="relay",
                         UPSTREAM_PASSWORD="Relay-secret-1")
        assert submit(proxy)[0] == 250
        assert hop.handler.logins == ["relay"]
        assert len(hop.handler.messages) == 1
    finally:
        hop.stop()


def test_wrong_next_hop_password_gives_451_and_nothing_is_archived(alice, start_proxy,
                                                                   tmp_path):
    tls = server_context(str(tmp_path / "hop.pem"), str(tmp_path / "hop.key"), "127.0.0.1")
    hop = NextHop(tls_context=tls, username="relay", password="Relay-secret-1").start()
    try:
        proxy = proxy_to(start_proxy, hop, UPSTREAM_USERNAME="relay", UPSTREAM_PASSWORD="nope")
        code, reply = submit(proxy)
        assert code == 451
        assert hop.handler.messages == [] and archived() == 0
    finally:
        hop.stop()


def test_connections_to_the_next_hop_are_reused(alice, start_proxy, hop):
    proxy = proxy_to(start_proxy, hop)
    for _ in range(3):
        assert submit(proxy)[0] == 250
    assert len(hop.handler.messages) == 3
    assert hop.handler.ehlo_count == 1


def test_without_a_pool_every_message_opens_its_own_connection(alice, start_proxy, hop):
    proxy = proxy_to(start_proxy, hop, UPSTREAM_POOL_SIZE=0)
    for _ in range(3):
        assert submit(proxy)[0] == 250
    assert hop.handler.ehlo_count == 3


def test_next_hop_restarted_between_messages_costs_no_message(alice, start_proxy):
    first = NextHop().start()
    proxy = proxy_to(start_proxy, first)
    assert submit(proxy)[0] == 250
    first.stop()
    second = NextHop(port=first.port).start()
    try:
        assert submit(proxy)[0] == 250
        assert len(second.handler.messages) == 1
    finally:
        second.stop()


def test_recipient_refused_by_next_hop_is_passed_back_when_it_was_the_only_one(
        alice, start_proxy, hop):
    hop.handler.refuse_rcpt["nobody@example.org"] = "550 5.1.1 No such user here"
    code, reply = submit(proxy_to(start_proxy, hop), rcpts=("nobody@example.org",))
    assert code == 550
    assert b"5.1.1 No such user here" in reply
    assert hop.handler.messages == [] and archived() == 0


def test_temporary_refusal_of_every_recipient_gives_451(alice, start_proxy, hop):
    hop.handler.refuse_rcpt["nobody@example.org"] = "550 5.1.1 No such user here"
    hop.handler.refuse_rcpt["full@example.org"] = "452 4.2.2 Mailbox full"
    code, _ = submit(proxy_to(start_proxy, hop),
                     rcpts=("nobody@example.org", "full@example.org"))
    assert code == 451


def test_partial_refusal_answers_250_and_mails_a_delivery_report_to_the_sender(
        alice, start_proxy, hop, redis_client):
    hop.handler.refuse_rcpt["nobody@example.org"] = "550 5.1.1 No such user here"
    code, _ = submit(proxy_to(start_proxy, hop), rcpts=("bob@example.org", "nobody@example.org"))
    assert code == 250
    assert [m.rcpt_tos for m in hop.handler.messages] == [["bob@example.org"]]
    jobs = Queue("outgoing", connection=redis_client).jobs
    assert [job.func_name for job in jobs] == ["worker.content_jobs.send_delivery_report"]

    result = run_worker_burst(process_env(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = hop.handler.wait_for(2)[1]
    assert report.mail_from == "<>"  # a bounce comes from the null sender
    assert report.rcpt_tos == ["alice@example.com"]
    parsed = email.message_from_bytes(report.data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert b"Final-Recipient: rfc822; nobody@example.org" in report.data
    assert b"Status: 5.1.1" in report.data
    assert b"Subject: Hello" in report.data  # the original's headers come along


RETRY_JOB = "worker.content_jobs.retry_deferred_recipients"


def queued(redis_client) -> list[str]:
    return [job.func_name for job in Queue("outgoing", connection=redis_client).jobs]


def scheduled_retries(redis_client) -> list[tuple[Job, float]]:
    """Retry jobs waiting in RQ's scheduled registry, with when each is due (epoch seconds)."""
    registry = ScheduledJobRegistry("outgoing", connection=redis_client)
    jobs = [Job.fetch(job_id, connection=redis_client) for job_id in registry.get_job_ids()]
    return [(job, registry.get_scheduled_time(job).timestamp()) for job in jobs
            if job.func_name == RETRY_JOB]


def test_a_recipient_refused_for_now_is_retried_by_the_worker_and_delivered(
        alice, start_proxy, hop, redis_client):
    hop.handler.refuse_rcpt["busy@example.org"] = "452 4.2.2 Mailbox full, try later"
    proxy = proxy_to(start_proxy, hop, DEFER_RETRY_SECONDS="0,3600")
    code, _ = submit(proxy, rcpts=("bob@example.org", "busy@example.org"))
    assert code == 250
    assert [m.rcpt_tos for m in hop.handler.messages] == [["bob@example.org"]]
    assert queued(redis_client) == [RETRY_JOB]

    hop.handler.refuse_rcpt.clear()  # the mailbox has room again
    result = run_worker_burst(process_env(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}"))
    assert result.returncode == 0, result.stderr[-2000:]
    first, retried = hop.handler.wait_for(2)
    assert retried.rcpt_tos == ["busy@example.org"]
    assert retried.mail_from == "alice@example.com"
    assert retried.data == first.data  # the very bytes relayed the first time (DKIM intact)
    assert len(hop.handler.messages) == 2  # no delivery report: nothing was lost
    assert queued(redis_client) == []


def test_a_recipient_still_refused_is_retried_later_and_then_reported(alice, start_proxy, hop,
                                                                      redis_client):
    hop.handler.refuse_rcpt["busy@example.org"] = "452 4.2.2 Mailbox full, try later"
    proxy = proxy_to(start_proxy, hop, DEFER_RETRY_SECONDS="0,3600")
    assert submit(proxy, rcpts=("bob@example.org", "busy@example.org"))[0] == 250

    env = process_env(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}", DEFER_RETRY_SECONDS="0,3600")
    result = run_worker_burst(env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(hop.handler.messages) == 1  # still refused: nothing sent, nothing reported
    ((job, due),) = scheduled_retries(redis_client)
    assert job.args[1] == ["busy@example.org"] and job.args[4] == 2  # the second attempt
    assert 3500 < due - time.time() <= 3600

    # Past the give-up age the next attempt reports the recipient to the sender instead.
    ScheduledJobRegistry("outgoing", connection=redis_client).remove(job)
    Queue("outgoing", connection=redis_client).enqueue_job(job)
    result = run_worker_burst(dict(env, DEFER_GIVE_UP_SECONDS="0"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = hop.handler.wait_for(2)[1]
    assert report.mail_from == "<>" and report.rcpt_tos == ["alice@example.com"]
    assert b"Final-Recipient: rfc822; busy@example.org" in report.data
    assert b"Status: 4.2.2" in report.data
    assert scheduled_retries(redis_client) == []


def test_a_next_hop_that_is_down_at_the_retry_defers_the_recipients_again(
        alice, start_proxy, hop, redis_client):
    hop.handler.refuse_rcpt["busy@example.org"] = "452 4.2.2 Mailbox full, try later"
    proxy = proxy_to(start_proxy, hop, DEFER_RETRY_SECONDS="0,3600")
    assert submit(proxy, rcpts=("bob@example.org", "busy@example.org"))[0] == 250
    hop.stop()  # nothing answers on its port now
    result = run_worker_burst(process_env(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}",
                                          DEFER_RETRY_SECONDS="0,3600"))
    assert result.returncode == 0, result.stderr[-2000:]
    ((job, due),) = scheduled_retries(redis_client)
    assert job.args[1] == ["busy@example.org"] and job.args[4] == 2
    assert 3500 < due - time.time() <= 3600


def test_a_report_the_last_retry_cannot_send_is_retried_on_its_own(alice, start_proxy, hop,
                                                                   redis_client):
    """The next hop is down at the last attempt: the recipient is given up, and the report
    saying so, which goes through the same next hop, waits for a retry of its own instead of
    failing with the attempt (the sender would never hear of the recipient)."""
    hop.handler.refuse_rcpt["busy@example.org"] = "452 4.2.2 Mailbox full, try later"
    proxy = proxy_to(start_proxy, hop, DEFER_RETRY_SECONDS="0,3600")
    assert submit(proxy, rcpts=("bob@example.org", "busy@example.org"))[0] == 250
    hop.stop()
    env = process_env(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}", DEFER_GIVE_UP_SECONDS="0")
    result = run_worker_burst(env)
    assert result.returncode == 0, result.stderr[-2000:]
    registry = ScheduledJobRegistry("outgoing", connection=redis_client)
    waiting = [job for job in (Job.fetch(job_id, connection=redis_client)
                               for job_id in registry.get_job_ids())
               if job.func_name == "worker.content_jobs.send_delivery_report"]
    assert len(waiting) == 1

    back = NextHop(port=hop.port).start()
    try:
        registry.remove(waiting[0])  # its retry is due now rather than in 10 s
        Queue("outgoing", connection=redis_client).enqueue_job(waiting[0])
        result = run_worker_burst(env)
        assert result.returncode == 0, result.stderr[-2000:]
        (report,) = back.handler.wait_for(1)
        assert report.mail_from == "<>" and report.rcpt_tos == ["alice@example.com"]
        assert b"Final-Recipient: rfc822; busy@example.org" in report.data
    finally:
        back.stop()


def test_partial_refusal_reports_the_final_ones_and_retries_the_temporary_ones(
        alice, start_proxy, hop, redis_client):
    hop.handler.refuse_rcpt["nobody@example.org"] = "550 5.1.1 No such user here"
    hop.handler.refuse_rcpt["busy@example.org"] = "452 4.2.2 Mailbox full, try later"
    code, _ = submit(proxy_to(start_proxy, hop),
                     rcpts=("bob@example.org", "nobody@example.org", "busy@example.org"))
    assert code == 250
    jobs = Queue("outgoing", connection=redis_client).jobs
    assert sorted(job.func_name for job in jobs) == [
        "worker.content_jobs.send_delivery_report"]  # the retry waits 300 s: scheduled
    assert [r for r, _, _ in jobs[0].args[1]] == ["nobody@example.org"]
    ((retry, due),) = scheduled_retries(redis_client)
    assert 200 < due - time.time() <= 300
    assert retry.args[1] == ["busy@example.org"]


def log_records(redis_client, count: int = 1, timeout: float = 5.0) -> list[dict]:
    """The message log's records in the Redis stream (the proxy appends them in the
    background: wait for ``count``)."""
    deadline = time.monotonic() + timeout
    while redis_client.xlen(message_log.STREAM) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return [json.loads(fields[b"r"]) for _, fields in redis_client.xrange(message_log.STREAM)]


def test_partial_refusal_answers_451_when_the_refused_recipients_cannot_be_handed_over(
        alice, start_proxy, hop, redis_client):
    """The Redis of the jobs is down: neither the retry of the 452 recipient nor the report
    of the 550 one can be queued, so the client keeps the message and sends it again."""
    hop.handler.refuse_rcpt["nobody@example.org"] = "550 5.1.1 No such user here"
    hop.handler.refuse_rcpt["busy@example.org"] = "452 4.2.2 Mailbox full, try later"
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    proxy = proxy_to(start_proxy, hop, RQ_REDIS_URL=dead)
    code, reply = submit(proxy, rcpts=("bob@example.org", "nobody@example.org",
                                       "busy@example.org"))
    assert code == 451, reply
    assert b"4.3.0" in reply
    assert archived() == 0  # the client sends it again: that copy is the one archived
    (record,) = log_records(redis_client)
    assert record["verdict"] == "deferred" and record["reply"].startswith("451")
    assert record["refused_count"] == 2


def test_partial_refusal_answers_451_when_only_the_report_cannot_be_queued(
        alice, start_proxy, hop):
    hop.handler.refuse_rcpt["nobody@example.org"] = "550 5.1.1 No such user here"
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proxy = proxy_to(start_proxy, hop, RQ_REDIS_URL=dead)
    code, reply = submit(proxy, rcpts=("bob@example.org", "nobody@example.org"))
    assert code == 451, reply


def test_a_bounce_partially_refused_needs_no_report_and_is_accepted(alice, start_proxy, hop):
    """A null sender gets no delivery report (a bounce never bounces): nothing is owed to
    anyone, so the dead job Redis does not matter."""
    hop.handler.refuse_rcpt["nobody@example.org"] = "550 5.1.1 No such user here"
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proxy = proxy_to(start_proxy, hop, RQ_REDIS_URL=dead)
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        code, _ = send(smtp, message(), sender="", rcpts=("bob@example.org",
                                                          "nobody@example.org"))
    assert code == 250


def test_a_bounce_whose_deferred_recipients_cannot_be_queued_answers_451(
        alice, start_proxy, hop, redis_client):
    """A bounce owes no report, but a recipient the next hop deferred is still owed the
    message: with the jobs' Redis down nobody would retry it, so the client keeps the bounce
    and sends it again (a 250 lost that recipient)."""
    hop.handler.refuse_rcpt["busy@example.org"] = "452 4.2.2 Mailbox full, try later"
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    proxy = proxy_to(start_proxy, hop, RQ_REDIS_URL=dead)
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        code, reply = send(smtp, message(), sender="", rcpts=("bob@example.org",
                                                              "busy@example.org"))
    assert code == 451, reply
    assert [m.rcpt_tos for m in hop.handler.messages] == [["bob@example.org"]]
    (record,) = log_records(redis_client)
    assert record["verdict"] == "deferred" and record["reply"].startswith("451")


def test_next_hop_answering_4xx_to_data_gives_451_and_nothing_is_archived(alice, start_proxy,
                                                                         hop):
    hop.handler.refuse_data = "451 4.3.0 Try again later"
    code, reply = submit(proxy_to(start_proxy, hop))
    assert code == 451
    assert archived() == 0


def test_next_hop_dying_mid_transfer_gives_451_and_the_retry_delivers_exactly_once(
        alice, start_proxy, hop):
    proxy = proxy_to(start_proxy, hop)
    hop.handler.abort_next_data = 1
    code, _ = submit(proxy)
    assert code == 451
    assert hop.handler.messages == [] and archived() == 0
    # The sender keeps the message and retries; the next hop now takes it, once.
    assert submit(proxy)[0] == 250
    assert len(hop.handler.messages) == 1
    assert archived() == 1


def test_next_hop_timing_out_gives_451(alice, start_proxy, hop):
    hop.handler.stall_data = 3.0
    code, _ = submit(proxy_to(start_proxy, hop, UPSTREAM_TIMEOUT=0.5))
    assert code == 451
    assert archived() == 0


def wait_until(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-at-a-time"])
def test_clients_hanging_up_mid_relay_leave_no_next_hop_connection_behind(
        alice, start_proxy, pipelining):
    """Each client sends its final dot and leaves while the next hop still thinks over the
    message: nobody will hear its answer, and its connection must not stay open outside the
    pool (one leaked per message, until the next hop drops them)."""
    hop = NextHop(pipelining=pipelining).start()
    hop.handler.slow_data = 2.0
    try:
        proxy = proxy_to(start_proxy, hop, UPSTREAM_POOL_SIZE=2)
        for sent in range(1, 6):
            smtp = client(proxy.port)
            try:
                smtp.login("alice@example.com", PASSWORD)
                assert smtp.mail("alice@example.com")[0] == 250
                assert smtp.rcpt("bob@example.org")[0] == 250
                assert smtp.docmd("DATA")[0] == 354
                smtp.send(message() + b".\r\n")
                assert wait_until(lambda n=sent: hop.handler.data_started == n)
            finally:
                smtp.close()  # gone before the reply
        assert wait_until(lambda: len(hop.handler.open_connections) <= 2), \
            f"{len(hop.handler.open_connections)} next-hop connections still open"
        hop.handler.slow_data = 0
        assert submit(proxy)[0] == 250  # the pool still works
    finally:
        hop.stop()


def raw_data(smtp, payload: bytes) -> tuple[int, bytes]:
    """MAIL, RCPT, then DATA with ``payload`` sent byte for byte (smtplib would fix it)."""
    assert smtp.mail("alice@example.com")[0] == 250
    assert smtp.rcpt("bob@example.org")[0] == 250
    assert smtp.docmd("DATA")[0] == 354
    smtp.send(payload)
    return smtp.getreply()


SMUGGLED = (b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
            b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n")


@pytest.mark.parametrize("fake_end", [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n"])
def test_fake_end_of_data_neither_ends_data_early_nor_passes_through(
        alice, start_proxy, hop, fake_end):
    proxy = proxy_to(start_proxy, hop)
    payload = (b"From: alice@example.com\r\nSubject: one\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000"
               b"\r\nMessage-ID: <one@example.com>\r\n\r\nfirst line" + fake_end + SMUGGLED
               + b".\r\n")
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        code, _ = raw_data(smtp, payload)
        assert code == 250
        # Exactly one reply came for the one message: the conversation is still in step.
        assert smtp.noop()[0] == 250
    assert len(hop.handler.messages) == 1
    relayed = hop.handler.messages[0]
    assert relayed.mail_from == "alice@example.com" and relayed.rcpt_tos == ["bob@example.org"]
    assert b"smuggled body" in relayed.data  # inside the one message, as text
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", relayed.data) is None  # CRLF only


def test_bare_line_endings_are_refused_when_configured(alice, start_proxy, hop):
    proxy = proxy_to(start_proxy, hop, BARE_LINE_ENDINGS="reject")
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        code, reply = raw_data(smtp, b"Subject: one\r\n\r\nfirst\n.\r\n" + SMUGGLED + b".\r\n")
        assert smtp.noop()[0] == 250
    assert code == 550 and reply.startswith(b"5.6.11")
    assert hop.handler.messages == []


def test_message_size_is_advertised_and_a_declared_size_above_it_refused(alice, start_proxy,
                                                                          hop):
    proxy = proxy_to(start_proxy, hop, MAX_MESSAGE_SIZE=20_000)
    with client(proxy.port) as smtp:
        assert smtp.esmtp_features["size"] == "20000"
        smtp.login("alice@example.com", PASSWORD)
        code, _ = smtp.mail("alice@example.com", options=["SIZE=50000"])
    assert code == 552


def test_message_larger_than_the_limit_gets_552_and_is_not_relayed(alice, start_proxy, hop):
    proxy = proxy_to(start_proxy, hop, MAX_MESSAGE_SIZE=20_000)
    code, _ = submit(proxy, message(body=("y" * 70 + "\n") * 1000))
    assert code == 552
    assert hop.handler.messages == []


def test_a_retry_whose_worker_is_killed_mid_attempt_is_run_again_by_rq(
        alice, start_proxy, hop, redis_client):
    """The deferred recipients live only in the retry job: a worker killed while it talks to
    the next hop (the OOM killer takes the work horse) must not drop them; RQ runs the job
    again, which delivers."""
    hop.handler.refuse_rcpt["busy@example.org"] = "452 4.2.2 Mailbox full, try later"
    proxy = proxy_to(start_proxy, hop, DEFER_RETRY_SECONDS="0,3600")
    assert submit(proxy, rcpts=("bob@example.org", "busy@example.org"))[0] == 250
    hop.handler.refuse_rcpt.clear()

    # A next hop that takes the connection and never greets: the attempt waits there.
    stall = socket.create_server(("127.0.0.1", 0))
    stall.settimeout(30)
    worker = subprocess.Popen(
        procfile_worker("--burst"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=process_env(UPSTREAM_SMTP=f"127.0.0.1:{stall.getsockname()[1]}"))
    try:
        attempt, _ = stall.accept()
        children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGKILL)  # the work horse, mid-attempt
        worker.wait(timeout=30)
        attempt.close()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        stall.close()
    [(job, due)] = scheduled_retries(redis_client)  # RQ's retry, after its first interval
    time.sleep(max(0.0, due - time.time()) + 0.5)

    result = run_worker_burst(process_env(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}"))
    assert result.returncode == 0, result.stderr[-2000:]
    first, retried = hop.handler.wait_for(2)
    assert retried.rcpt_tos == ["busy@example.org"]
    assert retried.data == first.data
    assert len(hop.handler.messages) == 2


def test_a_retry_run_again_after_it_queued_the_next_attempt_queues_no_second_one(
        instance, hop, redis_client):
    """Killed after it queued the next attempt but before it noted those recipients as
    settled, an attempt run again by RQ must not queue a second next attempt (both would
    deliver): the next attempt's id is made from this one's, and a run finding it queued
    leaves its recipients to it."""
    from datetime import UTC, datetime

    from outgoing.jobs import enqueue

    hop.handler.refuse_rcpt["busy@example.org"] = "452 4.2.2 Mailbox full, try later"
    env = process_env(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}", DEFER_RETRY_SECONDS="3600")
    arrival = datetime.now(UTC).replace(tzinfo=None).isoformat()
    enqueue(redis_client, RETRY_JOB, "alice@example.com", ["busy@example.org"],
            message(), arrival, 1, job_id="an-attempt")
    assert run_worker_burst(env).returncode == 0
    assert [job.args[1] for job, _ in scheduled_retries(redis_client)] == [["busy@example.org"]]

    redis_client.delete("og:retry-settled:an-attempt")  # the kill's window: not noted yet
    queue = Queue("outgoing", connection=redis_client)
    queue.enqueue_job(Job.fetch("an-attempt", connection=redis_client))  # RQ's retry
    assert run_worker_burst(env).returncode == 0
    assert [job.args[1] for job, _ in scheduled_retries(redis_client)] == [["busy@example.org"]]
