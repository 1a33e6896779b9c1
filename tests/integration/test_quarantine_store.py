"""The quarantine's promise: stored durably before the reply, kept across restarts, reported
(ARF job), released by the worker, expired by retention."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta

import pytest
from rq import Queue
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from outgoing.config import load_config
from outgoing.db import make_sessionmaker, session_scope
from outgoing.jobs import enqueue
from outgoing.models import ArchivedMessage, QuarantinedMessage, utcnow
from outgoing.quarantine import quarantine_message
from outgoing.storage import DB_PREFIX, read_body, store_for
from outgoing.users import get_or_create_domain
from tests.support import data
from tests.support.mail import GTUBE, client, message, send
from tests.support.services import TcpForwarder, process_env, run_worker_burst

PASSWORD = "Alice-pass-123"


def add_alice(**settings) -> int:
    return data.add_user("example.com", "user", "alice@example.com", PASSWORD, **settings)


def submit(proxy, msg: bytes) -> tuple[int, bytes]:
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        return send(smtp, msg)


def stored_rows() -> list[QuarantinedMessage]:
    return data.query(lambda s: list(s.scalars(select(QuarantinedMessage)
                                               .order_by(QuarantinedMessage.id))))


def quarantine_spam(start_proxy, rcpts: tuple[str, ...]) -> QuarantinedMessage:
    """alice's spam to ``rcpts``, quarantined (250): its row."""
    with client(start_proxy().port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert send(smtp, message(subject="Cheap", body=GTUBE), rcpts=rcpts)[0] == 250
    [row] = stored_rows()
    return row


def body_of(row_id: int, config: dict) -> bytes:
    return data.query(lambda s: read_body(config, s.get(QuarantinedMessage, row_id)))


def test_quarantined_message_survives_a_proxy_restart_and_can_be_released(
        instance, start_proxy, sink, redis_client):
    add_alice(quarantine_response="accept")
    first = start_proxy()
    assert submit(first, message(subject="Cheap", body=GTUBE))[0] == 250
    first.stop()
    second = start_proxy()
    [row] = stored_rows()
    assert GTUBE.encode() in body_of(row.id, second.config)
    assert submit(second, message())[0] == 250  # the restarted proxy relays as before

    enqueue(redis_client, "worker.quarantine_jobs.release_quarantined", row.id)
    result = run_worker_burst(process_env(UPSTREAM_SMTP=f"127.0.0.1:{sink.port}"))
    assert result.returncode == 0, result.stderr[-2000:]
    released = [m for m in sink.handler.wait_for(2) if b"Subject: Cheap" in m.data]
    assert len(released) == 1 and released[0].rcpt_tos == ["bob@example.org"]
    assert stored_rows()[0].released_at is not None


def test_every_quarantined_message_enqueues_its_abuse_report(instance, start_proxy, sink,
                                                             redis_client):
    add_alice()
    proxy = start_proxy()
    assert submit(proxy, message(body=GTUBE))[0] == 550
    [row] = stored_rows()
    jobs = [job for job in Queue("outgoing", connection=redis_client).jobs
            if job.func_name == "worker.jobs.send_abuse_report"]
    assert [job.args for job in jobs] == [(row.id,)]


@pytest.mark.parametrize("response,code", [("reject", 550), ("accept", 250)])
def test_failing_to_enqueue_the_report_does_not_change_the_reply(instance, start_proxy, sink,
                                                                  redis_client, response,
                                                                  code):
    add_alice(quarantine_response=response)
    proxy = start_proxy()
    redis_client.set("rq:queue:outgoing", "not a queue")  # every enqueue now fails
    assert submit(proxy, message(body=GTUBE))[0] == code
    assert len(stored_rows()) == 1


def test_a_subject_holding_a_nul_is_quarantined_and_archived_with_u_fffd_for_it(
        instance, start_proxy, sink):
    """PostgreSQL refuses NUL in text: the spam got 451 and was never quarantined, the clean
    message was relayed but not archived."""
    add_alice(message_archiving=True)
    proxy = start_proxy()
    nul = "=?utf-8?q?a=00b?="
    assert submit(proxy, message(subject=nul, body=GTUBE))[0] == 550
    assert submit(proxy, message(subject=nul))[0] == 250
    assert data.query(lambda s: [(r.subject, r.identity) for r in s.scalars(
        select(QuarantinedMessage))]) == [("a\ufffdb", "alice@example.com")]
    assert data.query(lambda s: [r.subject for r in s.scalars(select(ArchivedMessage))]) == [
        "a\ufffdb"]


def test_database_store_keeps_the_body_in_the_row(instance, start_proxy, sink):
    add_alice()
    proxy = start_proxy(MESSAGE_STORE="database")
    assert submit(proxy, message(body=GTUBE))[0] == 550
    [row] = stored_rows()
    assert row.storage_key == DB_PREFIX
    assert GTUBE.encode() in body_of(row.id, proxy.config)
    assert not (instance / "storage").exists()


def test_unknown_message_store_stops_with_a_clear_error(instance):
    from outgoing.storage import StorageError

    config = dict(load_config(), MESSAGE_STORE="s3")  # load_config itself refuses it
    with pytest.raises(StorageError, match="MESSAGE_STORE"):
        store_for(config)


def hold(config: dict, *, days_ago: float, subject: str) -> tuple[int, str]:
    factory = make_sessionmaker(config["DATABASE_URL"])

    with session_scope(factory) as db:
        domain = get_or_create_domain(db, "example.com")
        row = quarantine_message(db, store_for(config), domain_id=domain.id, user_id=None,
                                 mail_from="alice@example.com", rcpt_tos=["bob@example.org"],
                                 data=message(subject=subject, body=GTUBE), subject=subject,
                                 identity=None, client_ip="192.0.2.1", reason="spam",
                                 score=1000, rules=["GTUBE"],
                                 received_at=utcnow() - timedelta(days=days_ago))
        row_id, key = row.id, row.storage_key
    factory.kw["bind"].dispose()
    return row_id, key


def test_retention_job_removes_messages_older_than_fourteen_days(instance, redis_client):
    config = load_config()
    old_id, old_key = hold(config, days_ago=15, subject="old")
    new_id, new_key = hold(config, days_ago=13, subject="recent")
    enqueue(redis_client, "worker.quarantine_jobs.expire_stored_messages")
    result = run_worker_burst(process_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert [row.id for row in stored_rows()] == [new_id]
    if old_key != DB_PREFIX:  # bodies in files (MESSAGE_STORE=file) go with their rows
        storage = instance / "storage"
        assert not (storage / old_key).exists() and (storage / new_key).exists()


def test_retention_follows_the_configured_days(instance, app):
    config = load_config()
    hold(config, days_ago=3, subject="three days")
    keep_id, _ = hold(config, days_ago=1, subject="yesterday")
    app.config["QUARANTINE_RETENTION_DAYS"] = 2
    result = app.test_cli_runner().invoke(args=["quarantine", "expire"])
    assert result.exit_code == 0 and "removed 1" in result.output
    assert [row.id for row in stored_rows()] == [keep_id]


def test_a_released_copy_is_archived_under_the_users_domain_whatever_its_sender(
        instance, start_proxy, sink, redis_client):
    """Quarantined with another customer's domain as the envelope sender, then released: the
    archive copy is alice's domain's, not that customer's."""
    from outgoing.models import ArchivedMessage, Domain

    add_alice(quarantine_response="accept", message_archiving=True)
    data.add_user("shop.example.net", "user", "owner@shop.example.net", PASSWORD)
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert send(smtp, message(sender="sales@shop.example.net", subject="Spam as the shop",
                                  body=GTUBE), sender="sales@shop.example.net")[0] == 250
    [row] = stored_rows()
    enqueue(redis_client, "worker.quarantine_jobs.release_quarantined", row.id)
    result = run_worker_burst(process_env(UPSTREAM_SMTP=f"127.0.0.1:{sink.port}"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert data.query(lambda s: [(a.subject, s.get(Domain, a.domain_id).name)
                                 for a in s.scalars(select(ArchivedMessage))]) == [
        ("Spam as the shop", "example.com")]


def test_a_release_the_next_hop_takes_for_some_recipients_loses_none_of_the_others(
        instance, start_proxy, redis_client):
    """Released from the quarantine, the message is taken for bob, deferred (451) for carol
    and refused (550) for dave. carol's copy used to be dropped, the row marked released,
    and alice (told 250 when the message was quarantined) never heard of dave: now carol is
    retried from the relayed bytes, and alice gets a delivery report for dave."""
    from rq.registry import ScheduledJobRegistry

    from tests.support.content import NextHop

    add_alice(quarantine_response="accept")
    row = quarantine_spam(start_proxy, ("bob@example.org", "carol@example.org", "dave@example.org"))

    hop = NextHop().start()
    try:
        hop.handler.refuse_rcpt.update({"carol@example.org": "451 4.2.1 Mailbox busy",
                                        "dave@example.org": "550 5.1.1 No such user"})
        env = process_env(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}",
                          DEFER_RETRY_SECONDS="600")
        enqueue(redis_client, "worker.quarantine_jobs.release_quarantined", row.id)
        result = run_worker_burst(env)
        assert result.returncode == 0, result.stderr[-2000:]
        released, report = hop.handler.wait_for(2)
        assert released.rcpt_tos == ["bob@example.org"]
        assert report.rcpt_tos == ["alice@example.com"] and report.mail_from == "<>"
        assert b"dave@example.org" in report.data and b"carol@example.org" not in report.data
        assert stored_rows()[0].released_at is not None

        # carol's retry waits its turn; run it now, the next hop taking her this time.
        queue = Queue("outgoing", connection=redis_client)
        [retry] = [job for job in (queue.fetch_job(job_id) for job_id
                                   in ScheduledJobRegistry(queue=queue).get_job_ids())
                   if job.func_name == "worker.content_jobs.retry_deferred_recipients"]
        assert retry.args[1] == ["carol@example.org"]
        hop.handler.refuse_rcpt.clear()
        ScheduledJobRegistry(queue=queue).remove(retry)
        queue.enqueue_job(retry)
        result = run_worker_burst(env)
        assert result.returncode == 0, result.stderr[-2000:]
        again = hop.handler.wait_for(3)[2]
        assert again.rcpt_tos == ["carol@example.org"] and b"Subject: Cheap" in again.data
        assert len(hop.handler.messages) == 3
    finally:
        hop.stop()


def test_a_release_the_next_hop_refuses_for_everyone_is_reported_and_stays_quarantined(
        instance, start_proxy, redis_client):
    """Released, the message is refused for good (550) for both recipients: it stays in
    the quarantine, alice (told 250 when it was quarantined) gets a delivery report, and the
    domain's audit log keeps the next hop's answers for the admin who pressed Release.
    Before, the job only logged it: no report, and nothing the admin could see. alice signs
    with DKIM, and the second Release comes a second later (another signature time): still
    one report."""
    import json

    from outgoing.models import AuditEvent
    from tests.integration.test_proxy_content_dkim import publish_key
    from tests.support.content import NextHop

    add_alice(quarantine_response="accept", dkim_selector="og1")
    publish_key("example.com", "og1", "rsa")
    row = quarantine_spam(start_proxy, ("dave@example.org", "erin@example.org"))

    hop = NextHop().start()
    try:
        hop.handler.refuse_rcpt.update({"dave@example.org": "550 5.1.1 No such user",
                                        "erin@example.org": "550 5.7.1 Not wanted"})
        env = process_env(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}")
        for _ in range(2):  # pressed twice: one report
            enqueue(redis_client, "worker.quarantine_jobs.release_quarantined", row.id)
            result = run_worker_burst(env)
            assert result.returncode == 0, result.stderr[-2000:]
            time.sleep(1.1)
        [report] = hop.handler.wait_for(1)
        assert report.rcpt_tos == ["alice@example.com"] and report.mail_from == "<>"
        assert b"dave@example.org" in report.data and b"erin@example.org" in report.data
        assert b"No such user" in report.data
        assert stored_rows()[0].released_at is None  # still in the quarantine
        events = data.query(lambda s: [(e.domain_id, json.loads(e.detail)) for e in s.scalars(
            select(AuditEvent).where(AuditEvent.action == "release_refused"))])
        assert len(events) == 2 and events[0][0] == row.domain_id
        assert "dave@example.org: 550 5.1.1 No such user" in events[0][1]["next_hop_said"]
    finally:
        hop.stop()


def test_a_release_refused_for_everyone_some_only_for_now_loses_nobody(
        instance, start_proxy, redis_client):
    """Every recipient refused, dave for good (550), carol for now (451): dave is reported
    to alice and carol goes to the retry job, as when some recipient was taken. Before,
    the job failed (five RQ retries, then nothing) and dave was never reported."""
    from tests.support.content import NextHop

    add_alice(quarantine_response="accept")
    row = quarantine_spam(start_proxy, ("carol@example.org", "dave@example.org"))
    hop = NextHop().start()
    try:
        hop.handler.refuse_rcpt.update({"carol@example.org": "451 4.2.1 Mailbox busy",
                                        "dave@example.org": "550 5.1.1 No such user"})
        env = process_env(UPSTREAM_SMTP=f"127.0.0.1:{hop.port}", DEFER_RETRY_SECONDS="600")
        enqueue(redis_client, "worker.quarantine_jobs.release_quarantined", row.id)
        result = run_worker_burst(env)
        assert result.returncode == 0, result.stderr[-2000:]
        [report] = hop.handler.wait_for(1)
        assert report.rcpt_tos == ["alice@example.com"] and b"dave@example.org" in report.data
        assert b"carol@example.org" not in report.data
        from rq.registry import ScheduledJobRegistry
        queue = Queue("outgoing", connection=redis_client)
        retries = [job for job in (queue.fetch_job(job_id) for job_id
                                   in ScheduledJobRegistry(queue=queue).get_job_ids())
                   if job.func_name == "worker.content_jobs.retry_deferred_recipients"]
        assert [job.args[1] for job in retries] == [["carol@example.org"]]
    finally:
        hop.stop()


def test_a_release_whose_worker_died_is_taken_over_not_left_for_an_hour(
        instance, start_proxy, sink, redis_client):
    """A worker killed mid-release leaves the message's claim behind. RQ's retry of that job
    (the same job id), or a new Release once the holder has ended, takes it over; a claim
    whose job is still queued or running is left alone."""
    add_alice(quarantine_response="accept")
    proxy = start_proxy()
    for subject in ("Retried", "Clicked again", "Busy"):
        assert submit(proxy, message(subject=subject, body=GTUBE))[0] == 250
    retried, clicked, busy = stored_rows()
    redis_client.set(f"og:release:{retried.id}", "release-1")  # this very job, died before
    redis_client.set(f"og:release:{clicked.id}", "a-job-long-gone")
    holder = Queue("elsewhere", connection=redis_client).enqueue("builtins.print")
    redis_client.set(f"og:release:{busy.id}", holder.id)  # queued: at work
    enqueue(redis_client, "worker.quarantine_jobs.release_quarantined", retried.id,
            job_id="release-1")
    for row in (clicked, busy):
        enqueue(redis_client, "worker.quarantine_jobs.release_quarantined", row.id)

    result = run_worker_burst(process_env(UPSTREAM_SMTP=f"127.0.0.1:{sink.port}"))
    assert result.returncode == 0, result.stderr[-2000:]
    released = {row.subject: row.released_at is not None for row in stored_rows()}
    assert released == {"Retried": True, "Clicked again": True, "Busy": False}
    assert redis_client.get(f"og:release:{busy.id}") == holder.id.encode()


def test_two_releases_of_one_message_relay_it_once(instance, sink, redis_client, monkeypatch):
    """Release pressed twice: the second job read the message (not released yet), then the
    first relayed it, marked it released and gave its claim back, and only then did the
    second take the claim. It relayed the message a second time."""
    from tests.support import worker
    from worker import claims, quarantine_jobs

    user_id = add_alice()
    row_id = worker.add_spam("example.com", user_id, subject="Pressed twice")
    take_claim = claims.claim

    def first_release_ends_before_our_claim(*args, **kwargs):
        enqueue(redis_client, "worker.quarantine_jobs.release_quarantined", row_id)
        result = run_worker_burst(process_env(UPSTREAM_SMTP=f"127.0.0.1:{sink.port}"))
        assert result.returncode == 0, result.stderr[-2000:]
        return take_claim(*args, **kwargs)

    monkeypatch.setattr(claims, "claim", first_release_ends_before_our_claim)
    with worker.jobs_in_this_process(monkeypatch, UPSTREAM_SMTP=f"127.0.0.1:{sink.port}"):
        note = quarantine_jobs.release_quarantined(row_id)

    assert note == "already released"
    assert [m.rcpt_tos for m in sink.handler.messages] == [["victim@example.org"]]
    assert stored_rows()[0].released_at is not None


class CommitAnswerLost(TcpForwarder):
    """PostgreSQL through a relay that, once ``armed``, lets the COMMIT of a transaction that
    inserted a quarantined message through and then cuts the connection: the database
    commits, and its answer never reaches the proxy."""

    armed = False

    async def _accept(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        inserted = committed = False

        async def upward():
            nonlocal inserted, committed
            while chunk := await reader.read(65536):
                inserted = inserted or (self.armed and b"INSERT INTO quarantined_messages"
                                        in chunk)
                committed = inserted and b"COMMIT" in chunk
                up_writer.write(chunk)
                if committed:
                    self.armed = False
                    await asyncio.sleep(0.3)  # the database commits meanwhile
                    up_writer.transport.abort()
                    writer.transport.abort()
                    return

        async def downward():
            while chunk := await up_reader.read(65536):
                if not committed:
                    writer.write(chunk)
        await asyncio.gather(upward(), downward(), return_exceptions=True)


def test_a_commit_whose_answer_is_lost_keeps_the_body_of_the_row_it_may_have_made(
        instance, migrated, start_proxy, sink):
    """The client gets 451 (we cannot know the commit happened); the row that did commit
    can still be read and released, and the client's retry is stored as a message of its
    own, not over a body deleted under a committed row."""
    url = make_url(os.environ["DATABASE_URL"])
    if url.get_backend_name() != "postgresql":
        pytest.skip("a lost commit answer needs a networked database (run with PostgreSQL)")
    relay = CommitAnswerLost(url.host or "127.0.0.1", url.port or 5432).start()
    try:
        add_alice(quarantine_response="accept")
        proxy = start_proxy(DATABASE_URL=url.set(host="127.0.0.1", port=relay.port)
                            .render_as_string(hide_password=False))
        relay.armed = True
        assert submit(proxy, message(subject="Cheap", body=GTUBE))[0] == 451
        assert submit(proxy, message(subject="Cheap", body=GTUBE))[0] == 250
    finally:
        relay.stop()
    rows = stored_rows()
    assert len(rows) == 2
    config = load_config()
    for row in rows:
        assert GTUBE.encode() in read_body(config, row)


def test_a_release_whose_commit_fails_after_the_next_hop_took_it_is_relayed_once(
        instance, sink, redis_client, monkeypatch, database_behind_a_cable):
    """The database goes away while the next hop reads the released message: the job fails
    on its commit and RQ retries it. The retry, and Release pressed again once the database
    is back, record the release; neither relays the message again (both did)."""
    from tests.support import worker
    from worker import quarantine_jobs

    user_id = add_alice(message_archiving=True)
    row_id = worker.add_spam("example.com", user_id, subject="Released in an outage")
    with worker.database_cut_while_relaying(monkeypatch, database_behind_a_cable,
                                            sink) as database_back:
        with pytest.raises(OperationalError):
            quarantine_jobs.release_quarantined(row_id)
        database_back()
        assert stored_rows()[0].released_at is None  # and nothing recorded that
        assert quarantine_jobs.release_quarantined(row_id) == \
            "relayed before; its release is recorded now"  # RQ's retry
        assert quarantine_jobs.release_quarantined(row_id) == "already released"  # pressed

    assert len(sink.handler.messages) == 1
    assert stored_rows()[0].released_at is not None
    assert data.query(lambda s: len(s.scalars(select(ArchivedMessage)).all())) == 1
